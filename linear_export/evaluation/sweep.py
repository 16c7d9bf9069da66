"""The policy x budget sweep: likelihood, agreement with full, class accuracy, Fréchet distance."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engines.base import Engine
from ..engines.cache import KVCache
from ..runtime.decode import decode_batches, to_uint8
from ..runtime.generate import generate
from ..runtime.policies import Policy, fit_policy
from ..runtime.policy_spec import make_policy
from ..runtime.sampling import SamplingConfig
from .metrics import accuracy, frechet_distance, frechet_noise, token_agreement

Judge = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> logits, features


@dataclass
class EvalSubject:
    """What is evaluated: an engine, its image decoder, a judge, and real data.

    Class-conditional subjects generate `settings.classes`; others (Janus, Lumina) give their
    `conditions` (token prompts) and may lack a decoder, a judge and real data: then the
    teacher-forced NLL is taken on the full cache's own samples.
    """

    engine: Engine
    decode: Callable[[torch.Tensor], torch.Tensor] | None  # codes [B, h, w] -> [B, 3, H, W]
    judge: Judge | None  # classifier: logits and features; None skips accuracy and FD
    real_images: torch.Tensor | None  # [M, 3, H, W] in [-1, 1], the FD reference
    heldout_tokens: torch.Tensor | None  # [M', h, w] real images tokenised, for the NLL
    heldout_labels: Sequence | None  # [M'] their conditions
    conditions: list | None = None  # what to generate from; None: settings.classes


@dataclass(frozen=True)
class EvalSettings:
    policies: tuple[str, ...] = ("full", "linear", "streaming", "h2o", "window")
    budgets: tuple[str, ...] = ("1/2", "1/4", "1/6", "1/8")
    classes: tuple[int, ...] = tuple(range(10))
    samples_per_class: int = 20
    batch_size: int = 50
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=3.0,
                                                                             top_k=0))
    seed: int = 0
    knobs: dict = field(default_factory=dict)  # PolicyConfig knobs for linear (recent_lines...)
    kept_stages: int = 3  # line stages pictured for LineAR's kept cells
    head_budgets: str | None = None  # linear: per-head budgets file (linear-export calibrate)


@dataclass
class EvalRow:
    policy: str
    budget: str
    budget_tokens: int
    capacity: int
    nll: float
    nll_delta: float  # vs full
    nll_delta_pct: float
    nll_delta_se_pct: float  # standard error of nll_delta_pct, paired over held-out images
    agreement: float  # token agreement with full, same seed
    accuracy: float | None
    frechet: float | None
    frechet_noise: float | None  # bootstrap std of this configuration's distance
    seconds: float


@dataclass
class EvalResult:
    rows: list[EvalRow]
    real_frechet_floor: float | None  # FD between two halves of the real images
    samples: dict[str, np.ndarray]  # "policy budget" -> a few decoded images [n, H, W, 3]
    kept_cells: dict[str, np.ndarray]  # "line N" -> [layers, h, w] share of heads keeping a cell

    def as_json(self) -> dict:
        return {"rows": [asdict(row) for row in self.rows],
                "real_frechet_floor": self.real_frechet_floor}


class KeptCells:
    """Line-end hook: which grid cells each layer keeps, as a share of (row, head) pairs."""

    def __init__(self, layout, stages: list[int]):
        self.layout, self.stages, self.maps = layout, stages, {}

    def __call__(self, line: int, cache: KVCache) -> None:
        if line not in self.stages:
            return
        layout = self.layout
        positions = cache.positions[..., : cache.cache_len] - layout.prefix  # [L, B, H, n]
        kept = torch.zeros(positions.shape[0], layout.image_tokens)
        for layer, layer_positions in enumerate(positions):
            image = layer_positions[layer_positions >= 0]
            kept[layer] = torch.bincount(image.flatten(), minlength=layout.image_tokens).float()
            kept[layer] /= layer_positions.shape[0] * layer_positions.shape[1]
        self.maps[f"line {line}"] = kept.view(-1, layout.height, layout.width).numpy()


def run_sweep(subject: EvalSubject, settings: EvalSettings, progress: bool = False) -> EvalResult:
    """Evaluate `full` first, then every (policy, budget) against it."""
    engine = subject.engine
    layout = engine.family.token_layout(engine.layout)
    labels, conditions = _conditions(subject, settings)
    real_features, floor = _real_features(subject)
    configs = sweep_policies(engine, layout, settings)  # all checked before any generation
    stages = sorted({max(0, round(layout.height * share) - 1) for share in (0.25, 0.5, 0.9)})
    rows, samples, kept_cells, full = [], {}, {}, None
    heldout = (subject.heldout_tokens, subject.heldout_labels)
    for name, budget, policy in tqdm(configs, desc="eval", disable=not progress):
        started = time.perf_counter()
        tokens = generate_all(engine, conditions, policy, settings)
        if heldout[0] is None:  # no real data: the full cache's own samples are the reference
            heldout = (tokens, conditions)
        # Kept-cell maps assume one prefix length (class-conditional models).
        picture = subject.conditions is None and name == "linear" and budget == "1/4"
        hook = KeptCells(layout, stages) if picture else None
        per_image = teacher_forced_nll(engine, *heldout, policy, settings, hook)
        if hook is not None:
            kept_cells = hook.maps
        if full is None:
            full = (tokens, per_image)
        row_accuracy = frechet = noise = None
        if subject.decode is not None:
            images = decode_batches(subject.decode, tokens, settings.batch_size)
            if subject.judge is not None:
                logits, features = subject.judge(images)
                row_accuracy = accuracy(logits, labels)
                frechet = frechet_distance(features.numpy(), real_features)
                noise = frechet_noise(features.numpy(), real_features, seed=settings.seed)
            picks = torch.arange(0, len(conditions), settings.samples_per_class)
            samples[f"{name} {budget}"] = to_uint8(images[picks])
        rows.append(_row(name, budget, policy, tokens, per_image, full, row_accuracy, frechet,
                         noise, time.perf_counter() - started))
    return EvalResult(rows, floor, samples, kept_cells)


def sweep_policies(engine: Engine, layout, settings: EvalSettings) -> list[tuple[str, str, Policy]]:
    """(name, budget, policy) for `full`, then every policy but full at every budget, each
    sized to the engine's static cache where it has one (artifacts)."""
    configs = [("full", "1")] + [(name, budget) for name in settings.policies if name != "full"
                                 for budget in settings.budgets]
    chosen = []
    for name, budget in configs:
        linear = name == "linear"  # the knobs and per-head budgets are LineAR's
        policy = make_policy(layout, name, budget, model_config=engine.config,
                             head_budgets=settings.head_budgets if linear else None,
                             **(settings.knobs if linear else {}))
        if getattr(engine, "capacity", None) is not None:  # an artifact's static cache
            policy = fit_policy(policy, engine.capacity)
        chosen.append((name, budget, policy))
    return chosen


def _conditions(subject: EvalSubject, settings: EvalSettings) -> tuple[torch.Tensor | None, list]:
    """The labels (class-conditional subjects) and the conditions generated from."""
    if subject.conditions is not None:
        return None, subject.conditions
    labels = torch.tensor(settings.classes).repeat_interleave(settings.samples_per_class)
    return labels, labels.tolist()


def _real_features(subject: EvalSubject) -> tuple[np.ndarray | None, float | None]:
    """The judge's features of the real images, and the FD between their two halves."""
    if subject.judge is None:
        return None, None
    real_features = subject.judge(subject.real_images)[1].numpy()
    half = len(real_features) // 2
    return real_features, frechet_distance(real_features[:half], real_features[half:])


def _row(name: str, budget: str, policy: Policy, tokens: torch.Tensor, per_image: torch.Tensor,
         full: tuple[torch.Tensor, torch.Tensor], row_accuracy: float | None,
         frechet: float | None, noise: float | None, seconds: float) -> EvalRow:
    """One configuration's row, its likelihood and tokens measured against full's."""
    full_tokens, full_per_image = full
    nll, full_nll = per_image.mean().item(), full_per_image.mean().item()
    return EvalRow(
        policy=name, budget="all" if name == "full" else budget,
        budget_tokens=policy.budget, nll=nll,
        capacity=getattr(policy, "needed", policy.capacity),  # not an artifact's cache
        nll_delta=nll - full_nll, nll_delta_pct=100 * (nll - full_nll) / full_nll,
        nll_delta_se_pct=100 * paired_standard_error(per_image, full_per_image) / full_nll,
        agreement=token_agreement(tokens, full_tokens), accuracy=row_accuracy,
        frechet=frechet, frechet_noise=noise, seconds=seconds,
    )


def generate_all(engine: Engine, conditions: list, policy: Policy,
                 settings: EvalSettings) -> torch.Tensor:
    """Token grids for every condition, batch by batch; batch k always uses seed + k."""
    grids = []
    for index, start in enumerate(range(0, len(conditions), settings.batch_size)):
        batch = list(conditions[start:start + settings.batch_size])
        grids.append(generate(engine, batch, policy, settings.sampling,
                              seed=settings.seed + index).tokens)
    return torch.cat(grids)


def teacher_forced_nll(engine: Engine, heldout_tokens: torch.Tensor, heldout_conditions: Sequence,
                       policy: Policy, settings: EvalSettings,
                       hook: KeptCells | None) -> torch.Tensor:
    """NLL per token of each held-out token grid fed through the policy's cache (no CFG)."""
    no_guidance = SamplingConfig(cfg_scale=1.0, temperature=1.0, top_k=0)
    per_image = []
    for start in range(0, len(heldout_conditions), settings.batch_size):
        labels = list(heldout_conditions[start:start + settings.batch_size])
        truth = heldout_tokens[start:start + settings.batch_size]
        result = generate(engine, labels, policy, no_guidance,
                          seed=settings.seed, teacher_tokens=truth,
                          on_line_end=hook if start == 0 else None)
        per_image += result.stats.nll_per_image
    return torch.tensor(per_image, dtype=torch.float64)


def paired_standard_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    """Standard error of mean(values - reference), the images being the pairs (0 for one)."""
    differences = values - reference
    if len(differences) < 2:
        return 0.0
    return (differences.std() / len(differences) ** 0.5).item()
