"""Step-by-step comparison of an engine against the PyTorch reference, with Polygraphy."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from polygraphy.comparator import IterationResult, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from ..engines.base import Engine, StepOutput
from ..engines.cache import KVCache
from .generate import generate
from .policies import Policy
from .sampling import SamplingConfig, guide

OUTPUTS = ("logits", "present_key", "present_value", "attn_mass")
DECODE = ("logits", "present_key", "present_value", "present_query")  # the decode step's
DECODE_SUFFIX = " (decode)"
LINE_MASS = "line_mass"  # the score graph's, once per line end
# (atol, rtol) per output; an element passes when within either (Polygraphy's elemwise check).
# fp32: the DESIGN's 1e-4 on logits. fp16: a few ulps of values of order 1-10, where torch's
# and ORT's kernels round differently.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "fp32": {"logits": (1e-4, 1e-4), "present_key": (1e-4, 1e-4),
             "present_value": (1e-4, 1e-4), "attn_mass": (1e-5, 1e-4),
             "present_query": (1e-4, 1e-4), LINE_MASS: (1e-4, 1e-4)},
    # Weight-only int8/int4 (build --weights) against the fp32 model, about 2.5x the largest
    # errors `verify` measured on GPT-B random weights over a whole generation (int8: 0.060
    # on logits, 0.050 on K/V, 0.0069 on attn_mass; int4: 0.62, 0.58, 0.057). The score graph
    # has no weights. Greedy tokens may differ from fp32's: reported, not failed.
    "int8": {"logits": (0.15, 0.1), "present_key": (0.15, 0.1), "present_value": (0.15, 0.1),
             "attn_mass": (2e-2, 0.1), "present_query": (0.15, 0.1), LINE_MASS: (1e-4, 1e-4)},
    "int4": {"logits": (1.5, 0.3), "present_key": (1.5, 0.3), "present_value": (1.5, 0.3),
             "attn_mass": (0.15, 0.3), "present_query": (1.5, 0.3), LINE_MASS: (1e-4, 1e-4)},
    # w8a8 (7-bit weights per channel, activations per tensor at run time): measured the
    # same way, 0.154 on logits, 0.146 on K/V, 0.011 on attn_mass, 35 of 256 picks differing
    # (`verify DIR --batch 1 --policy linear`, an AVX2-only CPU; 8-bit weights had 0.104,
    # 0.088, 0.011).
    "w8a8": {"logits": (0.4, 0.1), "present_key": (0.35, 0.1), "present_value": (0.35, 0.1),
             "attn_mass": (3e-2, 0.1), "present_query": (0.35, 0.1), LINE_MASS: (1e-4, 1e-4)},
    "fp16": {"logits": (5e-2, 2e-2), "present_key": (2e-2, 1e-2),
             "present_value": (2e-2, 1e-2), "attn_mass": (5e-3, 2e-2),
             "present_query": (2e-2, 1e-2), LINE_MASS: (5e-2, 2e-2)},
}


@dataclass
class OutputStats:
    """One output's errors over every compared step."""

    name: str
    atol: float
    rtol: float
    steps: int = 0
    failed_steps: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    first_failure: int | None = None

    @property
    def passed(self) -> bool:
        return self.failed_steps == 0


@dataclass
class PolicyReport:
    policy: str
    capacity: int  # the cache the engines ran with (the artifact's)
    needed: int  # what the policy itself needs
    steps: int
    outputs: dict[str, OutputStats]
    teacher_forced_token_mismatches: int  # steps where the candidate's greedy pick differs
    free_run_token_mismatches: int  # tokens differing between the two engines' own generations
    first_free_run_mismatch: int | None
    # fp32 must pick identical greedy tokens; in fp16 a near-tie may flip, which is reported.
    require_identical_tokens: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        tokens_ok = self.free_run_token_mismatches == 0 or not self.require_identical_tokens
        return all(stats.passed for stats in self.outputs.values()) and tokens_ok


class LockstepEngine:
    """Feeds the reference's inputs and cache to both engines; the loop follows the reference.

    Every output of every step is compared with Polygraphy's SimpleCompareFunc: the scored
    step (attn_mass) and the decode step (present_query) both run on every step, and the
    line-end score graph on every line end that scores.
    """

    name = "lockstep"

    def __init__(self, reference: Engine, candidate: Engine, tolerances: dict, cfg_scale: float):
        self.reference, self.candidate, self.cfg_scale = reference, candidate, cfg_scale
        self.config, self.layout = reference.config, reference.layout
        self.family = reference.family
        self.dtype, self.device = reference.dtype, reference.device
        names = [*OUTPUTS, *(name + DECODE_SUFFIX for name in DECODE), LINE_MASS]
        self.stats = {name: OutputStats(name, *tolerances[name.removesuffix(DECODE_SUFFIX)])
                      for name in names}
        self.compare = SimpleCompareFunc(
            atol={name: stats.atol for name, stats in self.stats.items()},
            rtol={name: stats.rtol for name, stats in self.stats.items()},
            check_error_stat="elemwise",
        )
        self.steps = 0
        self.token_mismatches = 0
        self._candidate_logits: list[torch.Tensor] = []  # this token's calls, one per group

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
             need_scores: bool = False, score_position_ids: torch.Tensor | None = None,
             **prefix) -> StepOutput:
        """`prefix`: inputs_embeds for a feature prefix (llamagen-t2i), given to both."""
        reference = self.reference.step(input_ids, position_ids, cache, True,
                                        score_position_ids=score_position_ids, **prefix)
        candidate = self.candidate.step(input_ids, position_ids, cache, True,
                                        score_position_ids=score_position_ids, **prefix)
        # A feature prefill reports no attn_mass (nothing is cached yet to score).
        names = OUTPUTS if candidate.attn_mass is not None else OUTPUTS[:3]
        self._compare(*(_outputs(out, names, "") for out in (candidate, reference)))
        self._candidate_logits.append(candidate.logits.clone())  # buffers are reused
        self.steps += 1
        if need_scores or prefix:
            return reference
        # The decode step may write this step's keys at cache_len: what the host appends.
        reference = self.reference.step(input_ids, position_ids, cache)
        candidate = self.candidate.step(input_ids, position_ids, cache)
        names = DECODE if candidate.present_query is not None else DECODE[:3]
        self._compare(*(_outputs(out, names, DECODE_SUFFIX) for out in (candidate, reference)))
        return reference

    def score_line(self, line_query: torch.Tensor, score_shifts: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        reference = self.reference.score_line(line_query, score_shifts, cache)
        candidate = self.candidate.score_line(line_query, score_shifts, cache)
        self._compare({LINE_MASS: candidate}, {LINE_MASS: reference})
        return reference

    def generate(self, conditions: Sequence, policy: Policy, seed: int = 0):
        """A greedy generation that follows the reference, every step compared."""
        family = self.family
        greedy = SamplingConfig(cfg_scale=self.cfg_scale, temperature=0.0)
        groups = family.prefix_groups(list(conditions), greedy.uses_cfg, torch.device("cpu"))
        return generate(self, conditions, policy, greedy, seed=seed, family=family,
                        on_step=lambda _, logits: self.check_picks(logits, groups))

    def check_picks(self, reference_logits: torch.Tensor, groups: list) -> None:
        """After each token: do the guided greedy picks of all rows agree? (generate's on_step)

        The loop runs prefix groups one by one; their candidate logits are put back in the
        global row order [cond; uncond] before guidance, as generate does for the reference.
        """
        candidate = torch.empty_like(reference_logits)
        for group, logits in zip(groups, self._candidate_logits, strict=True):
            candidate[group.rows] = logits
        self._candidate_logits.clear()
        if self._pick(candidate).ne(self._pick(reference_logits)).any():
            self.token_mismatches += 1

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg_scale > 1.0:
            logits = guide(logits, self.cfg_scale)
        return logits.argmax(dim=-1)

    def _compare(self, candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray]
                 ) -> None:
        """Compare the same named outputs of both engines (stats keyed by those names)."""
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Relative errors are taken against the second result: the reference.
            results = self.compare(
                IterationResult({k: _array(v) for k, v in candidate.items()},
                                runner_name="candidate"),
                IterationResult({k: _array(v) for k, v in reference.items()},
                                runner_name="reference"))
        for name, result in results.items():
            stats = self.stats[name]
            stats.steps += 1
            stats.max_abs = max(stats.max_abs, float(result.max_absdiff))
            stats.max_rel = max(stats.max_rel, float(result.max_reldiff))
            if not bool(result):
                stats.failed_steps += 1
                if stats.first_failure is None:
                    stats.first_failure = self.steps


def _outputs(out: StepOutput, names: Sequence[str], suffix: str) -> dict[str, torch.Tensor]:
    return {name + suffix: getattr(out, name) for name in names}


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def compare_engines(
    reference: Engine,
    candidate: Engine,
    policy: Policy,
    class_ids: Sequence[int],
    *,
    cfg_scale: float,
    dtype_name: str,
    seed: int = 0,
) -> PolicyReport:
    """Teacher-forced per-step comparison plus greedy token identity of free-running generations.

    `policy` must already be sized for the candidate (see policies.fit_policy).
    """
    greedy = SamplingConfig(cfg_scale=cfg_scale, temperature=0.0)
    lockstep = LockstepEngine(reference, candidate, TOLERANCES[dtype_name], cfg_scale)
    expected = lockstep.generate(class_ids, policy, seed=seed).tokens
    own = generate(candidate, class_ids, policy, greedy, seed=seed).tokens
    differing = (own != expected).flatten(1).any(0).nonzero()
    return PolicyReport(
        policy=policy.name,
        capacity=policy.capacity,
        needed=getattr(policy, "needed", policy.capacity),
        steps=lockstep.steps,
        outputs={name: stats for name, stats in lockstep.stats.items() if stats.steps},
        teacher_forced_token_mismatches=lockstep.token_mismatches,
        free_run_token_mismatches=int((own != expected).sum()),
        first_free_run_mismatch=int(differing[0]) if len(differing) else None,
        require_identical_tokens=dtype_name == "fp32",
    )


def format_report(report: PolicyReport) -> str:
    """The per-output error table, then token identity, one policy."""
    slots = f"cache {report.capacity} slots" + (
        f", the policy needs {report.needed}" if report.needed != report.capacity else "")
    lines = [f"policy {report.policy} ({slots}, {report.steps} steps):",
             f"  {'output':<28}{'max abs':>11}{'max rel':>11}{'atol':>9}{'rtol':>9}"
             f"{'steps':>7}  result"]
    for stats in report.outputs.values():
        verdict = "pass" if stats.passed else (
            f"FAIL ({stats.failed_steps} steps, first at step {stats.first_failure})")
        lines.append(f"  {stats.name:<28}{stats.max_abs:>11.3g}{stats.max_rel:>11.3g}"
                     f"{stats.atol:>9.0e}{stats.rtol:>9.0e}{stats.steps:>7}  {verdict}")
    lines.append(f"  greedy picks differing under teacher forcing: "
                 f"{report.teacher_forced_token_mismatches} of {report.steps} steps")
    if report.free_run_token_mismatches:
        verdict = ("FAIL" if report.require_identical_tokens
                   else "informational outside fp32")
        lines.append(f"  free-running greedy tokens: {verdict} ({report.free_run_token_mismatches}"
                     f" differ, first at image token {report.first_free_run_mismatch})")
    else:
        lines.append("  free-running greedy tokens: identical (pass)")
    lines.extend(f"  note: {note}" for note in report.notes)
    return "\n".join(lines)
