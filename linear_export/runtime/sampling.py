"""Classifier-free guidance and token sampling (temperature, top-k, top-p) on the logits' device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    cfg_scale: float = 4.0  # 1.0 (or less) disables CFG: no uncond rows at all
    temperature: float = 1.0  # 0: greedy argmax
    top_k: int = 2000  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cfg_scale) and math.isfinite(self.temperature)):
            raise UserError(f"--cfg-scale {self.cfg_scale} and --temperature {self.temperature} "
                            "must be finite numbers; give e.g. --cfg-scale 4.0 --temperature 1.0.")
        if self.cfg_scale < 0:
            raise UserError(f"--cfg-scale {self.cfg_scale} is negative; use 1.0 for no guidance "
                            "or a value such as 4.0.")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} is negative; use 0 for greedy or "
                            "a positive value such as 1.0.")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} is negative; use 0 to disable it.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} is outside (0, 1]; use 1.0 to disable it.")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Rows are [cond; uncond]: uncond + (cond - uncond) * scale, as LlamaGen does."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * cfg_scale


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf what top-k (below the k-th largest) and then top-p (outside the nucleus) drop."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


Generators = torch.Generator | Sequence[torch.Generator] | None


def draw(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One index per row of probs [B, n]; with one generator per row, a row's draw depends on
    its own generator only, not on the other rows of the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)
    return torch.cat([torch.multinomial(row[None], 1, generator=own)
                      for row, own in zip(probs, generator, strict=True)])


def sample(logits: torch.Tensor, config: SamplingConfig, generator: Generators) -> torch.Tensor:
    """One token per row of logits [B, V] (already guided)."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / max(config.temperature, 1e-5)
    if 0 < config.top_k < logits.shape[-1] and config.top_p >= 1.0:
        # Drawing among the k largest is drawing from the masked distribution (up to ties at
        # the k-th value), at a fifth of the cost per step (GPT-B: 0.9 ms against 4.1 ms).
        values, indices = torch.topk(logits, config.top_k, dim=-1)
        pick = draw(torch.softmax(values, dim=-1), generator)
        return indices.gather(-1, pick).squeeze(-1)
    logits = filter_top_k_top_p(logits, config.top_k, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    return draw(probs, generator).squeeze(-1)
