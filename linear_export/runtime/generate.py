"""The host generation loop: prefill, decode, line-end eviction; returns tokens and stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..engines.base import Engine
from ..engines.cache import CacheShape, KVCache
from ..errors import UserError
from ..models.configs import SequenceLayout
from ..models.families.base import Family, PrefixGroup
from ..models.families.llamagen import LlamaGenC2I
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
    nll_per_image: list[float] | None = None  # the same mean, per image

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


@dataclass
class _Stream:
    """One prefix group: its rows, its own cache (uniform cache_len) and the policy for its P."""

    group: PrefixGroup
    rows: torch.Tensor
    cache: KVCache
    policy: Policy
    scores: torch.Tensor | None  # H2O's mass summed over every step [L, B, Hkv, C]
    line_queries: torch.Tensor | None  # LineAR: the line's scored queries [L, B, H, Q, D]
    input_ids: torch.Tensor
    positions: torch.Tensor  # model position ids fed to the engine
    slots: torch.Tensor  # sequence positions recorded in the cache (what policies read)
    inputs_embeds: torch.Tensor | None = None


def _streams(engine: Engine, groups: list[PrefixGroup], policy: Policy,
             full_layout: SequenceLayout) -> list[_Stream]:
    config, device = engine.config, engine.device
    streams = []
    for group in groups:
        shape = CacheShape(config.n_layer, len(group.rows), config.kv_heads, policy.capacity,
                           config.head_dim)
        # The same policy, told where this group's image region starts.
        own = policy if group.prefix == full_layout.prefix else Policy(
            policy.config, replace(full_layout, prefix=group.prefix))
        scores = queries = None
        if own.score_mode == "cumulative":
            scores = torch.zeros(shape.n_layer, shape.batch, shape.n_kv_head, shape.capacity,
                                 device=device)
        elif own.score_mode == "line":
            queries = torch.zeros(shape.n_layer, shape.batch, config.n_head, own.scored_queries,
                                  config.head_dim, dtype=engine.dtype, device=device)
        streams.append(_Stream(
            group, torch.tensor(group.rows, device=device),
            KVCache(shape, engine.dtype, device, head_shared=own.head_shared),
            own, scores, queries, group.input_ids, group.position_ids,
            torch.arange(group.prefix, device=device), group.inputs_embeds))
    return streams


def _step(engine: Engine, stream: _Stream, query_index: int, group_size: int) -> torch.Tensor:
    """Run one step of a stream, append its keys and values, keep what the policy scores
    with (LineAR: the query; H2O: the mass); returns the step's logits."""
    policy = stream.policy
    extra = {} if stream.inputs_embeds is None else {"inputs_embeds": stream.inputs_embeds}
    # H2O sums every step's mass; LineAR scores once per line from the stored queries.
    need_mass = policy.score_mode == "cumulative" and query_index >= 0
    out = engine.step(stream.input_ids, stream.positions, stream.cache, need_mass, **extra)
    # The check syncs with the device: on accelerators run it once per line only
    # (NaN/Inf reaches the cache, so it still shows up within one line).
    width = policy.layout.width
    if (engine.device.type == "cpu" or query_index % width == width - 1) and not torch.isfinite(
            out.logits).all():
        raise UserError(f"The model produced NaN/Inf logits at image token {query_index + 1} "
                        "(fp16 overflow?); rebuild or run with --dtype fp32 or bf16.")
    stream.cache.append(out.present_key, out.present_value, stream.slots)
    if need_mass:  # fold query heads onto the kv head they read from
        stream.scores += out.attn_mass.view(*stream.scores.shape[:3], group_size, -1).sum(3)
    slot = policy.query_slot(query_index) if query_index >= 0 else None
    if slot is not None:
        stream.line_queries[:, :, :, slot] = out.present_query[:, :, :, -1]
    return out.logits


def _end_line(engine: Engine, stream: _Stream, finished_line: int, cfg: bool) -> bool:
    """The policy's line-end eviction on one stream's cache; whether anything was evicted.

    LineAR's scores are computed here, once, from the finished line's stored queries.
    """
    cache, policy, live = stream.cache, stream.policy, stream.cache.cache_len
    scores = stream.scores
    if stream.line_queries is not None and policy.needs_scores(
            (finished_line + 1) * policy.layout.width - 1):
        shifts = policy.score_shifts(finished_line) or [0]
        scores = engine.score_line(stream.line_queries, torch.tensor(shifts), cache)
    live_scores = scores[..., :live] if scores is not None else None
    per_slot = () if stream.scores is None else (stream.scores,)  # H2O's sums move along
    if cache.owner is not None:
        keep = policy.select_pooled(cache.positions[..., :live], cache.owner[..., :live],
                                    live_scores, finished_line, cfg)
        if keep is not None:
            cache.compact_pooled(keep, *per_slot)
    else:
        keep = policy.select(cache.positions[..., :live], live_scores,
                             finished_line=finished_line, cfg=cfg)
        if keep is not None:
            cache.compact(keep, *per_slot)
    return keep is not None


def generate(
    engine: Engine,
    class_ids: Sequence,
    policy: Policy,
    sampling: SamplingConfig,
    *,
    seed: int | Sequence[int] = 0,
    progress: bool = False,
    teacher_tokens: torch.Tensor | None = None,
    on_line_end: Callable[[int, KVCache], None] | None = None,
    family: Family | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> GenerationResult:
    """Generate one image per condition, keeping the cache within the policy's capacity.

    `class_ids` are the family's conditions (class ids for LlamaGen c2i, prompt token ids or
    caption features for the others); `family` defaults to the engine's. `policy` must be
    bound to the family's token layout (lines of w + end-of-line tokens). With
    `teacher_tokens` [B, h, w] the loop feeds those codes instead of sampling (the result's
    tokens are still what sampling chose) and reports their mean negative log-likelihood
    under the (guided) logits. `on_line_end(line, cache)` sees each cache after each
    line-end eviction; `on_step(index, logits)` sees each step's unguided logits [rows, K].
    `seed` one per condition gives each image its own sampling generator: an image's draws
    then do not depend on which other images share its batch.
    """
    config, layout = engine.config, engine.layout
    family = family or getattr(engine, "family", None) or LlamaGenC2I.for_model(config, layout)
    lines = family.token_layout(layout)
    if (policy.layout.height, policy.layout.width) != (lines.height, lines.width):
        raise ValueError(f"the policy is bound to {policy.layout.height} lines of "
                         f"{policy.layout.width} tokens, the model's lines are {lines.height} x "
                         f"{lines.width}; build it on family.token_layout(layout)")
    device, batch = engine.device, len(class_ids)
    groups = family.prefix_groups(list(class_ids), sampling.uses_cfg, device)
    streams = _streams(engine, groups, policy, lines)
    rows = sum(len(group.rows) for group in groups)
    full_bytes = CacheShape(config.n_layer, rows, config.kv_heads, lines.length,
                            config.head_dim).nbytes(engine.dtype)
    if isinstance(seed, int):
        generator = torch.Generator(device=device).manual_seed(seed)
    elif len(seed) != batch:
        raise ValueError(f"{len(seed)} seeds for {batch} conditions; give one per condition")
    else:
        generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    tokens = torch.zeros(batch, layout.image_tokens, dtype=torch.long, device=device)
    group_size = config.n_head // config.kv_heads
    evictions = 0
    nll_sums = torch.zeros(batch, dtype=torch.float64, device=device)  # read once, at the end
    if teacher_tokens is not None:
        teacher_tokens = teacher_tokens.reshape(batch, layout.image_tokens).to(device)
    single = len(streams) == 1 and streams[0].group.rows == list(range(rows))

    step_slots = torch.arange(lines.image_tokens, device=device)  # host->device once
    started = time.perf_counter()
    bar = tqdm(total=lines.height, unit="line", disable=not progress, leave=False)
    # Prefill feeds each group's prefix; then one step per image-region token (the last one
    # is never fed): step `index` reads token index - 1, the query of image token index - 1.
    # Lines are `lines.width` tokens: the image codes plus any end-of-line.
    for index in range(lines.image_tokens):
        logits, evicted = None, False
        line_end = index > 0 and index % lines.width == 0  # line index // L - 1 is now cached
        for stream in streams:
            step_logits = _step(engine, stream, index - 1, group_size)
            if line_end:
                finished = index // lines.width - 1
                evicted |= _end_line(engine, stream, finished, sampling.uses_cfg)
                if on_line_end is not None:
                    on_line_end(finished, stream.cache)
            if single:
                logits = step_logits
            else:
                if logits is None:
                    logits = torch.empty(rows, step_logits.shape[-1], dtype=step_logits.dtype,
                                         device=device)
                logits[stream.rows] = step_logits
        evictions += evicted  # line ends at which any prefix group's cache was compacted
        if line_end:
            bar.update(1)
        if on_step is not None:
            on_step(index, logits)
        line, column = divmod(index, lines.width)
        forced = family.forced_token(column, layout.width)
        if forced is None:
            code_index = line * layout.width + column
            guided = guide(logits, sampling.cfg_scale) if sampling.uses_cfg else logits
            next_token = sample(guided, sampling, generator)
            tokens[:, code_index] = next_token
            if teacher_tokens is not None:
                next_token = teacher_tokens[:, code_index]
                log_probs = torch.log_softmax(guided.float(), dim=-1)
                nll_sums -= log_probs.gather(1, next_token[:, None])[:, 0].double()
            feed = family.feed_ids(next_token)
        else:
            feed = torch.full((batch,), forced, dtype=torch.long, device=device)
        # Feed token `index` to every row of its image (cond and uncond alike).
        for stream in streams:
            stream.input_ids = feed[stream.rows % batch][:, None]
            position = stream.group.image_position + index
            stream.positions = torch.full_like(stream.input_ids, position)
            stream.slots = step_slots[index: index + 1] + stream.group.prefix  # no copy
            stream.inputs_embeds = None
    bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started

    stats = GenerationStats(
        images=batch,
        seconds_generate=seconds,
        steps=lines.image_tokens,
        evictions=evictions,
        kv_capacity=policy.capacity,
        kv_bytes=sum(stream.cache.nbytes for stream in streams),
        full_kv_bytes=full_bytes,
        peak_cache_len=max(stream.cache.peak_len for stream in streams),
    )
    if teacher_tokens is not None:
        per_image = (nll_sums / layout.image_tokens).tolist()
        stats.nll_per_token, stats.nll_per_image = sum(per_image) / batch, per_image
    return GenerationResult(tokens.view(batch, layout.height, layout.width).cpu(), stats)
