"""The engine contract: one `step()` with identical semantics on every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..models.configs import GPTConfig, SequenceLayout
from ..runtime.cache import KVCache


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, V] float32, at the step's last position
    present_key: torch.Tensor  # [L, B, Hkv, T, D], this step's keys (post-RoPE) only
    present_value: torch.Tensor  # [L, B, Hkv, T, D]
    attn_mass: torch.Tensor | None  # [L, B, H, C] float32; None when not asked for


class Engine(Protocol):
    """Runs the decode step of one model; the host loop owns the cache and writes into it."""

    name: str
    config: GPTConfig
    layout: SequenceLayout
    dtype: torch.dtype
    device: torch.device

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        need_scores: bool = True,
    ) -> StepOutput:
        """Attend over the cache's live slots plus the step's own tokens; never writes the cache."""
        ...
