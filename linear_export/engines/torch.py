"""TorchEngine: the PyTorch step module itself, the reference every other engine must match."""

from __future__ import annotations

import torch

from ..models.attention import per_slot
from ..models.families.llamagen import LlamaGenC2I
from ..models.gpt import GPT
from .base import StepOutput
from .cache import KVCache


class TorchEngine:
    """Runs `model.step` eagerly; with `cuda_graph`, decode steps (T = 1) replay a CUDA graph;
    with `compile`, decode steps run `model.decode` under torch.compile (inductor).

    Compiling pays for long runs only (docs/speed.md: GPT-B 256 px on 2 CPU cores, 12% off a
    step for a 45 s compile, again for every new batch size or capacity), so it is not the
    default."""

    name = "torch"

    def __init__(self, model: GPT, *, cuda_graph: bool = False, compile: bool = False):
        self.model = model.eval()
        self.config, self.layout = model.config, model.layout
        self.dtype = model.dtype
        self.device = next(model.parameters()).device
        # How the runtime drives this model (models/families); a bare GPT is class-to-image.
        self.family = getattr(model, "family", None) or LlamaGenC2I.for_model(self.config,
                                                                                self.layout)
        self.graphs = None
        if cuda_graph:
            from .cuda_graph import DecodeGraphs  # raises a UserError off CUDA

            self.graphs = DecodeGraphs(self.model, self.device)
        # Static shapes: one graph per (rows, capacity), as a run has; cache_len is a tensor.
        self._compiled = torch.compile(self.model.decode, dynamic=False) if compile else None
        # Filled per step by a kernel: torch.tensor(cache_len) would be a host-to-device copy.
        self._cache_len = torch.zeros((), dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        need_scores: bool = False,
        score_position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step (Engine.step); `inputs_embeds` [B, T, dim] feeds a prefix that is no token
        (captions)."""
        input_ids, position_ids = input_ids.to(self.device), position_ids.to(self.device)
        if score_position_ids is not None and need_scores:
            score_position_ids = score_position_ids.to(self.device)
        else:
            score_position_ids = None
        if self.graphs is not None and input_ids.shape[1] == 1 and inputs_embeds is None:
            return self.graphs.step(input_ids, position_ids, cache, need_scores,
                                    score_position_ids)
        self._cache_len.fill_(cache.cache_len)
        embeds = None if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
        slots = per_slot(cache.shared_positions)
        if need_scores:
            logits, present_key, present_value, attn_mass = self.model.step(
                input_ids, position_ids, cache.key, cache.value, self._cache_len,
                inputs_embeds=embeds, score_position_ids=score_position_ids, **slots)
            return StepOutput(logits, present_key, present_value, attn_mass)
        compiled = self._compiled is not None and input_ids.shape[1] == 1 and embeds is None
        decode = self._compiled if compiled else self.model.decode
        logits, present_key, present_value, present_query, _ = decode(
            input_ids, position_ids, cache.key, cache.value, self._cache_len,
            inputs_embeds=embeds, **slots)
        return StepOutput(logits, present_key, present_value, None, present_query)

    @torch.inference_mode()
    def score_line(self, line_query: torch.Tensor, score_shifts: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        self._cache_len.fill_(cache.cache_len)
        return self.model.line_scores(line_query, score_shifts.to(self.device), cache.key,
                                      self._cache_len, **per_slot(cache.shared_positions))
