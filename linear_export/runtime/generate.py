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


@dataclass
class _Loop:
    """What one generate() call carries from step to step."""

    engine: Engine
    family: Family
    lines: SequenceLayout  # the family's token layout: lines of w codes (+ end-of-line)
    sampling: SamplingConfig
    streams: list[_Stream]
    generator: torch.Generator | list[torch.Generator]
    tokens: torch.Tensor  # [B, h * w] what sampling chose
    teacher: torch.Tensor | None  # [B, h * w] the codes fed instead, if any
    nll_sums: torch.Tensor  # [B] float64, teacher-forced runs; read once, at the end
    step_slots: torch.Tensor  # arange(image tokens) on the device: host->device once
    evictions: int = 0  # line ends at which any prefix group's cache was compacted

    def __post_init__(self):
        self.batch = self.tokens.shape[0]
        self.rows = sum(len(stream.group.rows) for stream in self.streams)
        # One stream holding every row in order: its logits are the batch's as they are.
        self.single = len(self.streams) == 1 and self.streams[0].group.rows == list(
            range(self.rows))


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


def _generators(seed: int | Sequence[int], batch: int, device: torch.device):
    """One generator for the batch, or one per condition (an image's draws then do not
    depend on which other images share its batch)."""
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    if len(seed) != batch:
        raise ValueError(f"{len(seed)} seeds for {batch} conditions; give one per condition")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]


def _begin(engine: Engine, family: Family, class_ids: Sequence, policy: Policy,
           sampling: SamplingConfig, seed, teacher_tokens: torch.Tensor | None) -> _Loop:
    """Check the policy against the family's lines; one stream (and cache) per prefix group."""
    lines = family.token_layout(engine.layout)
    if (policy.layout.height, policy.layout.width) != (lines.height, lines.width):
        raise ValueError(f"the policy is bound to {policy.layout.height} lines of "
                         f"{policy.layout.width} tokens, the model's lines are {lines.height} x "
                         f"{lines.width}; build it on family.token_layout(layout)")
    device, batch, codes = engine.device, len(class_ids), engine.layout.image_tokens
    groups = family.prefix_groups(list(class_ids), sampling.uses_cfg, device)
    if teacher_tokens is not None:
        teacher_tokens = teacher_tokens.reshape(batch, codes).to(device)
    return _Loop(engine, family, lines, sampling, _streams(engine, groups, policy, lines),
                 _generators(seed, batch, device),
                 torch.zeros(batch, codes, dtype=torch.long, device=device), teacher_tokens,
                 torch.zeros(batch, dtype=torch.float64, device=device),
                 torch.arange(lines.image_tokens, device=device))


def _step(engine: Engine, stream: _Stream, query_index: int) -> torch.Tensor:
    """Run one step of a stream, append its keys and values, keep what the policy scores
    with (LineAR: the query; H2O: the mass); returns the step's logits."""
    policy = stream.policy
    extra = {} if stream.inputs_embeds is None else {"inputs_embeds": stream.inputs_embeds}
    # H2O sums every step's mass; LineAR scores once per line from the stored queries.
    need_mass = policy.score_mode == "cumulative" and query_index >= 0
    out = engine.step(stream.input_ids, stream.positions, stream.cache, need_mass, **extra)
    # The check syncs with the device: on accelerators run it once per line only
    # (NaN/Inf reaches the cache, so it still shows up within one line). Any NaN/Inf makes
    # the fp32 sum non-finite (only logits near 1e34 could overflow it: a false alarm on
    # values no model gives); the sum costs 1/18 of isfinite().all() (GPT-B, 16 rows).
    width = policy.layout.width
    if (engine.device.type == "cpu" or query_index % width == width - 1) and not torch.isfinite(
            out.logits.sum(dtype=torch.float32)):
        raise UserError(f"The model produced NaN/Inf logits at image token {query_index + 1} "
                        "(fp16 overflow?); rebuild or run with --dtype fp32 or bf16.")
    stream.cache.append(out.present_key, out.present_value, stream.slots)
    if need_mass:  # fold query heads onto the kv head they read from
        group_size = engine.config.n_head // engine.config.kv_heads
        stream.scores += out.attn_mass.view(*stream.scores.shape[:3], group_size, -1).sum(3)
    slot = policy.query_slot(query_index) if query_index >= 0 else None
    if slot is not None:
        stream.line_queries[:, :, :, slot] = out.present_query[:, :, :, -1]
    return out.logits


def _decode(loop: _Loop, index: int) -> torch.Tensor:
    """Step `index` of every stream (0: the prefill of each group's prefix; then image token
    index - 1 is read and its query kept); the logits of all rows [rows, V]."""
    if loop.single:
        return _step(loop.engine, loop.streams[0], index - 1)
    logits = None
    for stream in loop.streams:
        step_logits = _step(loop.engine, stream, index - 1)
        if logits is None:
            logits = step_logits.new_empty(loop.rows, step_logits.shape[-1])
        logits[stream.rows] = step_logits
    return logits


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
    keep = policy.select(cache.positions[..., :live],
                         None if scores is None else scores[..., :live], finished_line, cfg)
    if keep is not None:
        cache.compact(keep, *(() if stream.scores is None else (stream.scores,)))  # H2O's sums
    return keep is not None


def _end_lines(loop: _Loop, finished_line: int,
               on_line_end: Callable[[int, KVCache], None] | None) -> None:
    """Every stream's line-end eviction, then what the caller sees of its cache."""
    evicted = False
    for stream in loop.streams:
        evicted |= _end_line(loop.engine, stream, finished_line, loop.sampling.uses_cfg)
        if on_line_end is not None:
            on_line_end(finished_line, stream.cache)
    loop.evictions += evicted


def _next_token(loop: _Loop, index: int, logits: torch.Tensor) -> torch.Tensor:
    """Image token `index` of every condition [B]: sampled from the guided logits (or the
    teacher's, whose NLL is summed), or the family's forced token (end of line)."""
    layout, sampling = loop.engine.layout, loop.sampling
    line, column = divmod(index, loop.lines.width)
    forced = loop.family.forced_token(column, layout.width)
    if forced is not None:
        return torch.full((loop.batch,), forced, dtype=torch.long, device=loop.tokens.device)
    code_index = line * layout.width + column
    guided = guide(logits, sampling.cfg_scale) if sampling.uses_cfg else logits
    next_token = sample(guided, sampling, loop.generator)
    loop.tokens[:, code_index] = next_token
    if loop.teacher is not None:
        next_token = loop.teacher[:, code_index]
        log_probs = torch.log_softmax(guided.float(), dim=-1)
        loop.nll_sums -= log_probs.gather(1, next_token[:, None])[:, 0].double()
    return loop.family.feed_ids(next_token)


def _feed(loop: _Loop, index: int, feed: torch.Tensor) -> None:
    """Token `index` is what every row of its image (cond and uncond alike) reads next."""
    for stream in loop.streams:
        stream.input_ids = feed[stream.rows % loop.batch][:, None]
        position = stream.group.image_position + index
        stream.positions = torch.full_like(stream.input_ids, position)
        stream.slots = loop.step_slots[index: index + 1] + stream.group.prefix  # no copy
        stream.inputs_embeds = None


def _result(loop: _Loop, policy: Policy, seconds: float) -> GenerationResult:
    config, layout, lines, batch = loop.engine.config, loop.engine.layout, loop.lines, loop.batch
    stats = GenerationStats(
        images=batch,
        seconds_generate=seconds,
        steps=lines.image_tokens,
        evictions=loop.evictions,
        kv_capacity=policy.capacity,
        kv_bytes=sum(stream.cache.nbytes for stream in loop.streams),
        full_kv_bytes=CacheShape(config.n_layer, loop.rows, config.kv_heads, lines.length,
                                 config.head_dim).nbytes(loop.engine.dtype),
        peak_cache_len=max(stream.cache.peak_len for stream in loop.streams),
    )
    if loop.teacher is not None:
        per_image = (loop.nll_sums / layout.image_tokens).tolist()
        stats.nll_per_token, stats.nll_per_image = sum(per_image) / batch, per_image
    return GenerationResult(loop.tokens.view(batch, layout.height, layout.width).cpu(), stats)


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
    on_line: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate one image per condition, keeping the cache within the policy's capacity.

    `class_ids` are the family's conditions (class ids for LlamaGen c2i, prompt token ids or
    caption features for the others); `family` defaults to the engine's. `policy` must be
    bound to the family's token layout (lines of w + end-of-line tokens). With
    `teacher_tokens` [B, h, w] the loop feeds those codes instead of sampling (the result's
    tokens are still what sampling chose) and reports their mean negative log-likelihood
    under the (guided) logits. `on_line_end(line, cache)` sees each cache after each
    line-end eviction; `on_step(index, logits)` sees each step's unguided logits [rows, K];
    `on_line(line, lines)` is told each line that is done (progress).
    `seed` one per condition gives each image its own sampling generator: an image's draws
    then do not depend on which other images share its batch.
    """
    loop = _begin(engine, family or engine.family, class_ids, policy, sampling, seed,
                  teacher_tokens)
    lines = loop.lines
    started = time.perf_counter()
    bar = tqdm(total=lines.height, unit="line", disable=not progress, leave=False)

    def line_done(line: int) -> None:
        bar.update(1)
        if on_line is not None:
            on_line(line, lines.height)

    # Step 0 feeds each group's prefix; step `index` then reads image token index - 1 (the
    # last one is never fed). A line is `lines.width` tokens: the codes plus any end-of-line.
    for index in range(lines.image_tokens):
        logits = _decode(loop, index)
        if index > 0 and index % lines.width == 0:  # line index // width - 1 is now cached
            _end_lines(loop, index // lines.width - 1, on_line_end)
            line_done(index // lines.width - 1)
        if on_step is not None:
            on_step(index, logits)
        _feed(loop, index, _next_token(loop, index, logits))
    line_done(lines.height - 1)
    bar.close()
    return _result(loop, policy, time.perf_counter() - started)
