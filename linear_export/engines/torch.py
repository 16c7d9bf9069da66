"""TorchEngine: the PyTorch step module itself, the reference every other engine must match."""

from __future__ import annotations

import torch

from ..models.gpt import GPT
from ..runtime.cache import KVCache
from .base import StepOutput


class TorchEngine:
    name = "torch"

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.config, self.layout = model.config, model.layout
        self.dtype = model.output.weight.dtype
        self.device = model.output.weight.device

    @torch.inference_mode()
    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        need_scores: bool = True,
    ) -> StepOutput:
        logits, present_key, present_value, attn_mass = self.model.step(
            input_ids.to(self.device),
            position_ids.to(self.device),
            cache.key,
            cache.value,
            cache.cache_len_tensor(),
        )
        return StepOutput(logits, present_key, present_value, attn_mass if need_scores else None)
