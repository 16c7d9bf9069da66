"""The baseline: LlamaGen's own full-cache PyTorch decode loop, the yardstick for every ratio.

It mirrors the original `generate()` (LlamaGen autoregressive/models/generate.py and gpt.py):
a static per-layer KV cache of round_up(P + N, 8) slots, each step writes its k/v at its
position, and attention runs with `F.scaled_dot_product_attention` over the whole static cache
with a boolean causal-mask row. No eviction, no scores. Same weights, CFG, sampling and seeding
as `runtime.generate`, so greedy tokens agree exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..engines.cache import kv_bytes
from ..models.configs import round_up
from ..models.families.llamagen import check_class_ids
from ..models.gpt import GPT
from .sampling import SamplingConfig, guide, sample


@dataclass
class BaselineResult:
    tokens: torch.Tensor  # [B, h, w] int64 image-token ids
    seconds: float  # the loop only: cache setup, prefill, decode and sampling
    step_seconds: list[float] = field(default_factory=list)  # each decode step, sampling included
    kv_capacity: int = 0
    kv_bytes: int = 0

    @property
    def images_per_s(self) -> float:
        return self.tokens.shape[0] / self.seconds if self.seconds > 0 else 0.0


class BaselineLoop:
    """LlamaGen's inference path over a `GPT`'s modules, with its static cache and causal mask."""

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.config, self.layout = model.config, model.layout
        self.dtype = model.output.weight.dtype
        self.device = model.output.weight.device
        # LlamaGen's setup_caches: max_seq_length = find_multiple(T + max_new_tokens, 8).
        self.capacity = round_up(self.layout.length, 8)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.causal = torch.ones(self.capacity, self.capacity, dtype=torch.bool,
                                 device=self.device).tril()

    def setup_cache(self, rows: int) -> int:
        """Allocate the zeroed static caches [rows, Hkv, capacity, D] per layer; returns bytes."""
        config = self.config
        shape = (rows, config.kv_heads, self.capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in range(config.n_layer)]
        self.values = [torch.zeros_like(key) for key in self.keys]
        return kv_bytes(config.n_layer, rows, config.kv_heads, self.capacity, config.head_dim,
                        self.dtype)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] float32 at the last of `input_ids` [B, T], at positions `input_pos` [T]."""
        model = self.model
        group = self.config.n_head // self.config.kv_heads
        cos_sin = model.rope[input_pos][None]  # [1, T, D/2, 2], broadcast over rows
        mask = self.causal[input_pos][None, None]  # [1, 1, T, capacity]: a row per query
        h = model.embed(input_ids)
        batch, steps, _ = h.shape
        for layer, key_cache, value_cache in zip(model.layers, self.keys, self.values,
                                                 strict=True):
            attention = layer.attention
            q, k, v = attention.project(layer.attention_norm(h), cos_sin)
            key_cache[:, :, input_pos] = k
            value_cache[:, :, input_pos] = v
            # The original repeats kv heads on every step (a full-cache copy even when group
            # is 1); kept, because that is the cost being measured against.
            keys = key_cache.repeat_interleave(group, dim=1)
            values = value_cache.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            h = h + attention.wo(out.transpose(1, 2).reshape(batch, steps, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return model.output(model.norm(h[:, -1])).float()

    @torch.inference_mode()
    def generate(
        self, class_ids: Sequence[int], sampling: SamplingConfig, *, seed: int = 0
    ) -> BaselineResult:
        """One image per class id, exactly as `runtime.generate` with the `full` policy samples."""
        config, layout, device = self.config, self.layout, self.device
        check_class_ids(class_ids, config.num_classes)
        batch = len(class_ids)
        classes = torch.tensor(list(class_ids), dtype=torch.long, device=device)
        if sampling.uses_cfg:
            classes = torch.cat([classes, torch.full_like(classes, config.null_class)])
        rows = classes.shape[0]
        generator = torch.Generator(device=device).manual_seed(seed)
        tokens = torch.zeros(batch, layout.image_tokens, dtype=torch.long, device=device)
        step_seconds: list[float] = []

        started = time.perf_counter()
        nbytes = self.setup_cache(rows)
        input_ids = (config.vocab_size + classes)[:, None].expand(rows, layout.prefix)
        input_pos = torch.arange(layout.prefix, device=device)
        for index in range(layout.image_tokens):
            step_started = time.perf_counter()
            logits = self.step(input_ids, input_pos)
            guided = guide(logits, sampling.cfg_scale) if sampling.uses_cfg else logits
            next_token = sample(guided, sampling, generator)
            tokens[:, index] = next_token
            input_ids = torch.cat([next_token] * (rows // batch))[:, None]
            input_pos = torch.tensor([layout.prefix + index], device=device)
            if device.type == "cuda":  # runtime.generate syncs every step too (finite check)
                torch.cuda.synchronize(device)
            if index > 0:  # index 0 is the prefill
                step_seconds.append(time.perf_counter() - step_started)
        seconds = time.perf_counter() - started
        self.keys, self.values = [], []
        return BaselineResult(tokens.view(batch, layout.height, layout.width).cpu(), seconds,
                              step_seconds, self.capacity, nbytes)
