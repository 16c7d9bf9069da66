"""TorchEngine: the PyTorch step module itself, the reference every other engine must match."""

from __future__ import annotations

import torch

from ..models.attention import pool_args
from ..models.gpt import GPT
from ..runtime.cache import KVCache
from .base import StepOutput


class TorchEngine:
    """Runs `model.step` eagerly; with `cuda_graph`, decode steps (T = 1) replay a CUDA graph."""

    name = "torch"

    def __init__(self, model: GPT, *, cuda_graph: bool = False):
        self.model = model.eval()
        self.config, self.layout = model.config, model.layout
        self.dtype = model.dtype
        self.device = next(model.parameters()).device
        self.family = model.family  # how the runtime drives this model (models/families)
        self.graphs = None
        if cuda_graph:
            from .cuda_graph import DecodeGraphs  # raises a UserError off CUDA

            self.graphs = DecodeGraphs(self.model, self.device)
        # Filled per step by a kernel: torch.tensor(cache_len) would be a host-to-device copy.
        self._cache_len = torch.zeros((), dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        need_scores: bool = True,
        score_position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step; `inputs_embeds` [B, T, dim] feeds a prefix that is no token (captions).

        `score_position_ids` [B, R, T] (default position_ids): where the queries that measure
        attn_mass are rotated to, R rotations of each (LineAR's lookahead); the mass sums them.
        """
        input_ids, position_ids = input_ids.to(self.device), position_ids.to(self.device)
        if score_position_ids is not None and need_scores:
            score_position_ids = score_position_ids.to(self.device)
        else:
            score_position_ids = None
        if self.graphs is not None and input_ids.shape[1] == 1 and inputs_embeds is None:
            logits, present_key, present_value, attn_mass = self.graphs.step(
                input_ids, position_ids, cache, score_position_ids)
        else:
            self._cache_len.fill_(cache.cache_len)
            embeds = None if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
            logits, present_key, present_value, attn_mass = self.model.step(
                input_ids, position_ids, cache.key, cache.value, self._cache_len,
                inputs_embeds=embeds, score_position_ids=score_position_ids,
                **pool_args(cache.owner))
        return StepOutput(logits, present_key, present_value, attn_mass if need_scores else None)
