"""The engine contract: one `step()` with identical semantics on every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import UserError
from ..models.configs import GPTConfig, SequenceLayout
from .cache import KVCache

if TYPE_CHECKING:
    from ..models.families.base import Family


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, V] float32, at the step's last position
    present_key: torch.Tensor  # [L, B, Hkv, T, D], this step's keys (post-RoPE) only
    present_value: torch.Tensor  # [L, B, Hkv, T, D]
    attn_mass: torch.Tensor | None  # [L, B, H, C] float32; only from the scored step
    present_query: torch.Tensor | None = None  # [L, B, H, T, D] post-RoPE; the decode step's


class Engine(Protocol):
    """Runs the decode step of one model; the host loop owns the cache and writes into it."""

    name: str
    config: GPTConfig
    layout: SequenceLayout
    family: Family  # how the runtime drives the model (prefix, CFG rows, line width)
    dtype: torch.dtype
    device: torch.device

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        need_scores: bool = False,
        score_position_ids: torch.Tensor | None = None,
    ) -> StepOutput:
        """Attend over the cache's live slots plus the step's own tokens.

        Without `need_scores`, the decode step: no attn_mass, the step's queries in
        present_query. With it, the scored step: attn_mass measured with the queries rotated
        to `score_position_ids` [B, R, T] (default: their own positions), summed over the R
        rotations (H2O's every-step mass). Slots [0, cache_len) are never written; an engine
        may write the step's own keys and values into slots [cache_len, cache_len + T),
        exactly what the host then appends there.
        """
        ...

    def score_line(self, line_query: torch.Tensor, score_shifts: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """LineAR's line-end scores [L, B, Hkv, C] float32 (models' line_scores): the mass
        the line's last Q queries [L, B, H, Q, D], moved by `score_shifts` [R] positions,
        gave each live slot."""
        ...


def check_bound_cache(engine, cache: KVCache, batch: int, limit: str) -> None:
    """What engines that bind the cache in place need: rows, capacity, dtype, device, layout.

    `engine` has max_batch, capacity, dtype and device; `limit` names its batch limit.
    """
    if batch > engine.max_batch:
        raise UserError(f"A batch of {batch} rows exceeds {limit} {engine.max_batch}; lower "
                        "--batch-size (CFG doubles the rows) or rebuild with a larger "
                        "--max-batch.")
    if cache.capacity != engine.capacity:
        raise ValueError(f"cache capacity {cache.capacity} differs from the artifact's "
                         f"{engine.capacity}; run the policy through fit_policy()")
    if cache.dtype != engine.dtype or cache.key.device != engine.device:
        raise ValueError(f"cache is {cache.dtype} on {cache.key.device}, the engine runs "
                         f"{engine.dtype} on {engine.device}")
    if not (cache.key.is_contiguous() and cache.value.is_contiguous()):
        raise ValueError("the KV cache must be contiguous to be bound in place")
    if cache.head_shared and not engine.artifact.head_shared:
        raise UserError(f"Artifact '{engine.artifact.path}' was built without --head-budgets, so "
                        "its step cannot run per-head budgets; rebuild it with linear-export "
                        "build --head-budgets FILE, or drop --head-budgets.")


def check_room(cache: KVCache, steps: int) -> None:
    """Engines that write the step's keys into the cache need its slots to exist."""
    if cache.cache_len + steps > cache.capacity:
        raise RuntimeError(f"KV cache overflow: {cache.cache_len + steps} slots needed, "
                           f"capacity {cache.capacity}")


def scoring_positions(position_ids: torch.Tensor,
                      score_position_ids: torch.Tensor | None) -> torch.Tensor:
    """What a scored graph's score_position_ids [B, R, T] gets: the queries' own when not
    given (R = 1); [B, T] is one rotation."""
    scored = position_ids if score_position_ids is None else score_position_ids
    return scored.view(scored.shape[0], -1, position_ids.shape[-1])
