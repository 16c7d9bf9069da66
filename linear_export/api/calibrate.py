"""Calibrate LineAR's per-head budgets (and position prior) for a model: an oracle that sees
the full cache's future attention lets each layer's kv heads share its slots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..engines import make_engine
from ..errors import UserError
from ..evaluation.oracle import calibrate_head_budgets
from ..evaluation.position_prior import WEIGHTS, PositionPrior, calibrate_position_prior
from ..models import get_config, load_gpt
from ..models.configs import SequenceLayout
from ..runtime.generate import generate
from ..runtime.head_budgets import HeadBudgets
from ..runtime.policies import Policy, PolicyConfig
from ..runtime.policy_spec import make_policy as layout_policy
from ..runtime.sampling import SamplingConfig
from .models import DEFAULT_CFG_SCALE, DEMO_CFG_SCALE, ModelSource, demo_source

SOURCES = ("auto", "samples", "demo-data")
DEMO_CALIBRATION_START = 1000  # held-out demo images from here on: none that eval scores
Log = Callable[[str], None]


@dataclass(frozen=True)
class CalibrationSettings:
    budgets: tuple[str, ...] = ("1/2", "1/4", "1/6", "1/8")
    recent_lines: int | None = None
    anchor: int = PolicyConfig.anchor
    lookahead: int | None = None
    position_prior: bool = True
    images: int = 100
    data: str = "auto"  # samples (the model's own, full cache) or demo-data; auto: by model
    cfg_scale: float | None = None  # samples' guidance [default: the model's]
    batch_size: int = 4
    seed: int = 0


def calibrate(source: ModelSource, settings: CalibrationSettings | None = None, *,
              progress: bool = False, log: Log = lambda line: None) -> HeadBudgets:
    """Per-head budget tables (one per evicting budget) for LlamaGen class-to-image `source`."""
    settings = settings or CalibrationSettings()
    if settings.images < 1 or settings.batch_size < 1:
        raise UserError("--images and --batch-size must be at least 1.")
    demo = source.demo
    if demo and not source.bundled_demo:
        source = demo_source(source)
    data = settings.data
    if data == "auto":
        data = "demo-data" if demo else "samples"
    if data == "demo-data" and not demo:
        raise UserError("--source demo-data holds the demo model's images; for your model use "
                        "--source samples.")
    config = get_config(source.model)
    layout = SequenceLayout.for_image(config, source.image_size)
    knobs = {"recent_lines": settings.recent_lines, "anchor": settings.anchor,
             "lookahead": settings.lookahead}
    policies = [layout_policy(layout, "linear", budget, **knobs)
                for budget in settings.budgets]
    if not policies:
        raise UserError("--budgets is empty; give budgets such as 1/4,1/6.")
    model = load_gpt(source.model, source.image_size, source.checkpoint, seed=source.seed)
    tokens, labels = _calibration_images(model, data, settings.images, settings.cfg_scale,
                                         settings.seed, demo, progress, log)
    tables, kept_knobs, priors = {}, {}, {}
    for policy in policies:
        if not policy.evicts:
            log(f"budget {policy.budget} tokens keeps the whole image: no table needed")
            continue
        tables[policy.budget], kept_knobs[policy.budget], prior = _calibrate_budget(
            model, tokens, labels, policy, settings, progress, log)
        if prior is not None:
            priors[policy.budget] = prior
    if not tables:
        raise UserError("No budget given evicts anything; give budgets below the whole image.")
    return HeadBudgets(tables, (layout.height, layout.width), config.n_layer, config.kv_heads,
                       kept_knobs, source=f"{data}, {settings.images} images, seed "
                                          f"{settings.seed}",
                       priors={tokens: found.prior for tokens, found in priors.items()},
                       prior_weights={tokens: found.weight for tokens, found in priors.items()})


def _calibrate_budget(model, tokens: torch.Tensor, labels: list[int], policy: Policy,
                      settings: CalibrationSettings, progress: bool, log: Log):
    """One budget's table, the knobs it was found with, and its position prior (or None)."""
    images, batch_size = settings.images, settings.batch_size
    with tqdm(total=images, unit="image", disable=not progress, leave=False,
              desc=f"budget {policy.budget}") as bar:
        table = calibrate_head_budgets(model, tokens, labels, policy, batch_size, bar.update)
    pooled = Policy(replace(policy.config, head_budgets=table), policy.layout)
    knobs = {"recent_lines": policy.recent_lines, "anchor": settings.anchor,
             "lookahead": pooled.lookahead}
    log(_summary(table, policy))
    if not settings.position_prior:
        return table, knobs, None
    with tqdm(total=images, unit="image", disable=not progress, leave=False,
              desc=f"prior {policy.budget}") as bar:
        prior = calibrate_position_prior(model, tokens, labels, pooled, batch_size, bar.update)
    log(_prior_summary(prior))
    return table, knobs, prior


def _calibration_images(model, source: str, images: int, cfg_scale: float | None, seed: int,
                        demo: bool, progress: bool, log: Log) -> tuple[torch.Tensor, list[int]]:
    """Token grids [n, h, w] and their classes: the demo's held-out data, or own samples."""
    classes = model.config.num_classes
    if source == "demo-data":
        from ..demo import load_demo_vq
        from ..demo.blocks import encode_blocks
        from ..demo.dataset import dataset_split

        pictures, labels = dataset_split("heldout", images, start=DEMO_CALIBRATION_START)
        with torch.inference_mode():
            return encode_blocks(load_demo_vq(), pictures), labels.tolist()
    labels = [index % classes for index in range(images)]
    if cfg_scale is None:
        cfg_scale = DEMO_CFG_SCALE if demo else DEFAULT_CFG_SCALE
    sampling = SamplingConfig(cfg_scale=cfg_scale)
    engine, full = make_engine("torch", model), Policy(PolicyConfig("full"), model.layout)
    log(f"sampling {images} images with the full cache (CFG {cfg_scale})")
    grids = [generate(engine, labels[start:start + 16], full, sampling, seed=seed + start,
                      progress=progress).tokens
             for start in range(0, images, 16)]
    return torch.cat(grids), labels


def _summary(table: torch.Tensor, policy: Policy) -> str:
    """One line per budget: how unevenly the heads share, at the middle eviction."""
    line = (table.shape[0] + policy.budget // policy.layout.width) // 2
    middle = table[min(line, table.shape[0] - 1)]
    spread = ", ".join(f"L{layer} {int(row.min())}-{int(row.max())}"
                       for layer, row in enumerate(middle))
    return (f"budget {policy.budget} tokens per head: after line {min(line, table.shape[0] - 1)}"
            f" the heads keep {spread}")


def _prior_summary(found: PositionPrior) -> str:
    """Which heads lean on the prior, and what it did to the calibration images' NLL."""
    heads = [f"L{layer}H{head} " + (f"{weight:g}" if weight < WEIGHTS[-1] else "alone")
             for layer, head in found.weight.nonzero().tolist()
             for weight in [float(found.weight[layer, head])]]
    change = 100 * (found.nll_after / found.nll_before - 1) if found.nll_before else 0.0
    return (f"  position prior on {len(heads)} of {found.weight.numel()} heads"
            f"{': ' + ', '.join(heads) if heads else ''} (emulated NLL {change:+.2f}%)")
