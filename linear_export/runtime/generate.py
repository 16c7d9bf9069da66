"""The host generation loop: prefill, decode, line-end eviction; returns tokens and stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engines.base import Engine
from ..errors import UserError
from .cache import CacheShape, KVCache
from .policies import Policy
from .sampling import SamplingConfig, guide, sample


@dataclass
class GenerationStats:
    images: int
    seconds_generate: float  # the loop only: no loading, no decoding
    steps: int
    evictions: int
    kv_capacity: int
    kv_bytes: int  # allocated K/V bytes of this run's cache
    full_kv_bytes: int  # the same batch with the full cache (capacity P + N)
    peak_cache_len: int
    nll_per_token: float | None = None  # teacher-forced runs: mean -log p(true token)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds_generate if self.seconds_generate > 0 else 0.0


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, h, w] int64 image-token ids
    stats: GenerationStats


def check_class_ids(class_ids: Sequence[int], num_classes: int) -> None:
    bad = [c for c in class_ids if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"Class id {bad[0]} is out of range; this model has classes "
                        f"0..{num_classes - 1}.")


def generate(
    engine: Engine,
    class_ids: Sequence[int],
    policy: Policy,
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    teacher_tokens: torch.Tensor | None = None,
    on_line_end: Callable[[int, KVCache], None] | None = None,
) -> GenerationResult:
    """Generate one image per class id, keeping the cache within the policy's capacity.

    With `teacher_tokens` [B, h, w] the loop feeds those tokens instead of sampling (the
    result's tokens are still what sampling chose) and reports their mean negative
    log-likelihood under the (guided) logits. `on_line_end(line, cache)` sees the cache after
    each line-end eviction.
    """
    config, layout = engine.config, engine.layout
    check_class_ids(class_ids, config.num_classes)
    device, batch = engine.device, len(class_ids)
    classes = torch.tensor(list(class_ids), dtype=torch.long, device=device)
    if sampling.uses_cfg:
        classes = torch.cat([classes, torch.full_like(classes, config.null_class)])
    rows = classes.shape[0]
    shape = CacheShape(config.n_layer, rows, config.kv_heads, policy.capacity, config.head_dim)
    cache = KVCache(shape, engine.dtype, device)
    full_bytes = CacheShape(config.n_layer, rows, config.kv_heads, layout.length,
                            config.head_dim).nbytes(engine.dtype)
    scores = None
    if policy.score_mode:
        scores = torch.zeros(shape.n_layer, rows, shape.n_kv_head, shape.capacity, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.zeros(batch, layout.image_tokens, dtype=torch.long, device=device)
    group = config.n_head // config.kv_heads
    evictions = 0
    nll_sum = torch.zeros((), dtype=torch.float64)
    if teacher_tokens is not None:
        teacher_tokens = teacher_tokens.reshape(batch, layout.image_tokens).to(device)

    started = time.perf_counter()
    bar = tqdm(total=layout.height, unit="line", disable=not progress, leave=False)
    # Prefill: the class token(s) at positions [0, P); the RoPE table makes their q and k zero.
    input_ids = (config.vocab_size + classes)[:, None].expand(rows, layout.prefix)
    positions = torch.arange(layout.prefix, device=device)
    need_scores = policy.needs_scores(-1)
    for index in range(layout.image_tokens):
        out = engine.step(input_ids, positions.expand(rows, -1), cache, need_scores)
        logits = out.logits
        if not torch.isfinite(logits).all():
            raise UserError(f"The model produced NaN/Inf logits at image token {index} (fp16 "
                            "overflow?); rebuild or run with --dtype fp32 or bf16.")
        cache.append(out.present_key, out.present_value, positions)
        if scores is not None and out.attn_mass is not None:
            # Fold query heads onto the kv head they read from.
            mass = out.attn_mass.view(*scores.shape[:2], scores.shape[2], group, -1).sum(3)
            scores += mass
        if index > 0 and index % layout.width == 0:  # the line of token index-1 is now cached
            keep = policy.select(cache.positions[..., : cache.cache_len],
                                 scores[..., : cache.cache_len] if scores is not None else None,
                                 finished_line=index // layout.width - 1, cfg=sampling.uses_cfg)
            if keep is not None:
                cache.compact(keep, *(() if scores is None else (scores,)))
                evictions += 1
            if policy.score_mode == "line":
                scores.zero_()
            if on_line_end is not None:
                on_line_end(index // layout.width - 1, cache)
            bar.update(1)
        guided = guide(logits, sampling.cfg_scale) if sampling.uses_cfg else logits
        next_token = sample(guided, sampling, generator)
        tokens[:, index] = next_token
        if teacher_tokens is not None:
            next_token = teacher_tokens[:, index]
            log_probs = torch.log_softmax(guided.float(), dim=-1)
            nll_sum -= log_probs.gather(1, next_token[:, None]).sum().double().cpu()
        # Feed token `index` (to cond and uncond rows alike); the last one is never fed.
        input_ids = torch.cat([next_token] * (rows // batch))[:, None]
        positions = torch.tensor([layout.prefix + index], device=device)
        need_scores = policy.needs_scores(index)
    bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started

    stats = GenerationStats(
        images=batch,
        seconds_generate=seconds,
        steps=layout.image_tokens,
        evictions=evictions,
        kv_capacity=policy.capacity,
        kv_bytes=cache.nbytes,
        full_kv_bytes=full_bytes,
        peak_cache_len=cache.peak_len,
        nll_per_token=None if teacher_tokens is None
        else nll_sum.item() / (batch * layout.image_tokens),
    )
    return GenerationResult(tokens.view(batch, layout.height, layout.width).cpu(), stats)
