"""The oracle's selection: what the full cache's future attention would keep.

It reads the future, so it is no policy. It bounds what scoring can reach at a budget
(scripts/oracle_selection.py), and its pooled form, averaged over a model's own images,
calibrates the per-head budgets that the head-shared pool runs (`linear-export calibrate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..models.gpt import GPT
from ..runtime.policies import Policy


def teacher_sequence(model: GPT, tokens: torch.Tensor, labels: list[int]):
    """Image codes [B, N], the whole sequence's ids (class token first) and its RoPE tables."""
    images = tokens.reshape(len(labels), -1)
    ids = torch.cat([torch.tensor(labels)[:, None] + model.config.vocab_size, images], 1)
    return images, ids, model.rope[torch.arange(ids.shape[1]).expand_as(ids)]


def future_attention(model: GPT, tokens: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """[L, B, Hkv, lines, keys]: attention each image line's queries pay each key (full cache)."""
    return _attention_by_line(model, tokens, labels)


def line_scores(model: GPT, tokens: torch.Tensor, labels: list[int],
                policy: Policy) -> torch.Tensor:
    """[L, B, Hkv, lines, keys]: LineAR's scores at each line end, teacher-forced: the mass
    of the line's scoring queries, rotated `policy.lookahead` lines ahead as the runtime
    rotates them, over the whole (full) cache, each query's own key left out as the steps
    leave it out."""
    layout = policy.layout
    positions = torch.arange(layout.length)
    image_index = positions - layout.prefix
    line = image_index.div(layout.width, rounding_mode="floor").clamp(min=0)
    shifts = [policy.score_shifts(int(query_line)) for query_line in line]
    rotations = max(1, policy.lookahead if policy.score_mode == "line" else 0)
    tables = [model.rope[positions + torch.tensor([0 if shift is None else shift[rotation]
                                                   for shift in shifts])]
              for rotation in range(rotations)]
    scoring = torch.tensor([index >= 0 and policy.needs_scores(int(index))
                            for index in image_index])
    return _attention_by_line(model, tokens, labels, tables, scoring)


@torch.inference_mode()
def _attention_by_line(model: GPT, tokens: torch.Tensor, labels: list[int],
                       score_tables: list[torch.Tensor] | None = None,
                       scoring: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass per (layer, kv head, image line, key) of the full teacher-forced pass,
    measured with the queries as they are, or rotated by each RoPE table of `score_tables`
    [N, ...] (summed) and only those of the queries `scoring` [N] marks."""
    config, layout = model.config, model.layout
    _, ids, cos_sin = teacher_sequence(model, tokens, labels)
    hidden, per_layer = model.embed(ids), []
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    group = config.n_head // config.kv_heads
    rotated = [cos_sin] if score_tables is None else [table.expand(len(labels), *table.shape)
                                                      for table in score_tables]
    for layer in model.layers:
        x = layer.attention_norm(hidden)
        _, k, _ = layer.attention.project(x, cos_sin)
        k = k.repeat_interleave(group, dim=1)
        mass = 0
        for table in rotated:
            q = layer.attention.project(x, table)[0]
            mass = mass + ((q @ k.transpose(-1, -2)) / math.sqrt(config.head_dim)).masked_fill(
                ~causal, -math.inf).softmax(-1)
        if scoring is not None:  # a step reports its mass on past slots: not on its own key
            mass = mass * scoring[:, None] * ~torch.eye(len(scoring), dtype=torch.bool)
        image = mass[:, :, layout.prefix:layout.prefix + layout.image_tokens]
        by_line = image.reshape(*image.shape[:2], layout.height, layout.width, -1).sum(3)
        per_layer.append(by_line.view(by_line.shape[0], config.kv_heads, group,
                                      *by_line.shape[2:]).sum(2))
        hidden = hidden + layer.attention.full(x, cos_sin)
        hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
    return torch.stack(per_layer)


@torch.inference_mode()
def masked_nll(model: GPT, tokens: torch.Tensor, labels: list[int],
               visible: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced NLL per image [B] with per-(layer, kv head) visibility (None: causal)."""
    config, layout = model.config, model.layout
    images, ids, cos_sin = teacher_sequence(model, tokens, labels)
    group = config.n_head // config.kv_heads
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    hidden = model.embed(ids)
    for index, layer in enumerate(model.layers):
        x = layer.attention_norm(hidden)
        q, k, v = layer.attention.project(x, cos_sin)
        mask = causal if visible is None else visible[index].repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                             v.repeat_interleave(group, dim=1), attn_mask=mask)
        hidden = hidden + layer.attention.wo(out.transpose(1, 2).flatten(2))
        hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
    logits = model.output(model.norm(hidden)).float()[:, layout.prefix - 1:-1]
    picked = logits.log_softmax(-1).gather(-1, images[..., None])[..., 0]
    return -picked.double().mean(1)


def ranking_lines(finished_line: int, count: int) -> slice:
    """The image lines after `finished_line` whose attention ranks the keys (0: all)."""
    return slice(finished_line + 1, finished_line + 1 + count if count else None)


def oracle_visibility(future: torch.Tensor, policy: Policy, allocation: str | torch.Tensor,
                      count: int = 0) -> torch.Tensor:
    """[L, B, Hkv, N, N] bool: the keys each query sees under the oracle's evictions.

    The oracle ranks the keys by the attention later lines pay them. `allocation`: "uniform"
    (every head keeps the budget), "pooled" (a layer's kv heads share one budget) or fixed
    image tokens per head after each line, [lines - 1, L, Hkv]. `count`: how many later
    lines' attention ranks the keys (0: all of them).
    """
    length = policy.layout.length

    def rank_by_future(finished: int, alive: torch.Tensor) -> torch.Tensor:
        return future[:, :, :, ranking_lines(finished, count)].sum(3)[..., :length]

    return evict_by_line(rank_by_future, policy, allocation, future.shape[:3])


def evict_by_line(rank: Callable[[int, torch.Tensor], torch.Tensor], policy: Policy,
                  allocation: str | torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """[L, B, Hkv, N, N] bool: the keys each query sees when each line end keeps the keys
    `rank(finished_line, alive)` [L, B, Hkv, N] ranks highest, `alive` being what is still
    cached; the prefix, anchor and recent lines are always kept.

    Line f's eviction (after its last token is cached) hides keys from the queries of lines
    f + 1 on; evicted keys never come back. `allocation` as in `oracle_visibility`.
    """
    layout = policy.layout
    layers, batch, heads = shape
    length, prefix, width = layout.length, layout.prefix, layout.width
    image_index = torch.arange(length) - prefix
    visible = torch.ones(length, length, dtype=torch.bool).tril().repeat(layers, batch, heads,
                                                                          1, 1)
    alive = torch.ones(layers, batch, heads, length, dtype=torch.bool)
    for finished in range(layout.height - 1):
        newest = (finished + 1) * width - 1
        cached = alive & (image_index <= newest)
        if int((cached & (image_index >= 0)).sum(-1).max()) <= policy.budget:
            continue
        always = ((image_index < policy.config.anchor)
                  | (image_index > newest - policy.recent_lines * width))
        priority = rank(finished, cached).float().masked_fill(always, math.inf)
        priority = priority.masked_fill(~cached, -math.inf)
        keep = prefix + policy.budget
        if isinstance(allocation, torch.Tensor):
            order = priority.argsort(-1, descending=True)
            ranks = torch.arange(length).expand_as(order)
            rank_of = torch.empty_like(order).scatter_(-1, order, ranks)
            kept = rank_of < prefix + allocation[finished][:, None, :, None]
        elif allocation == "pooled":
            flat = priority.flatten(2)
            kept = torch.zeros_like(flat).scatter_(-1, flat.topk(heads * keep).indices, 1)
            kept = kept.view_as(priority).bool()
        else:
            kept = torch.zeros_like(priority).scatter_(-1, priority.topk(keep).indices, 1).bool()
        alive = (kept & cached) | (image_index > newest)
        visible[..., prefix + newest + 1:, :] &= alive[..., None, :]
    return visible


def kept_per_head(visible: torch.Tensor, policy: Policy) -> torch.Tensor:
    """[lines - 1, L, Hkv]: image keys each head still holds after each line but the last,
    summed over the images of a [L, B, Hkv, N, N] visibility."""
    layout = policy.layout
    first_queries = [layout.prefix + (line + 1) * layout.width
                     for line in range(layout.height - 1)]
    return torch.stack([visible[..., query, layout.prefix:query].sum((1, -1)).float()
                        for query in first_queries])


def static_budgets(kept_mean: torch.Tensor, policy: Policy) -> torch.Tensor:
    """[lines - 1, L, Hkv] image tokens each head keeps after each line but the last: the
    pooled oracle's mean counts (`kept_per_head` / images), rounded so every layer keeps the
    budget, and every head its recent lines and anchor and no more than it has cached."""
    layout = policy.layout
    floor = policy.config.anchor + policy.recent_lines * layout.width
    budgets = []
    for line, share in enumerate(kept_mean):
        cached = (line + 1) * layout.width
        if cached <= policy.budget:  # nothing evicted yet
            budgets.append(torch.full(share.shape, cached))
            continue
        budgets.append(round_per_layer(share, share.shape[-1] * policy.budget, floor, cached))
    return torch.stack(budgets)


def round_per_layer(share: torch.Tensor, total: int, low: int, high: int) -> torch.Tensor:
    """Integers within [low, high] proportional to `share` [L, Hkv], each row summing to total."""
    target = share.clamp(min=low)
    target = target / target.sum(-1, keepdim=True) * total
    counts = target.floor().long().clamp(low, high)
    for row, wanted in zip(counts, target, strict=True):  # largest remainders first
        while int(row.sum()) != total:
            step = 1 if int(row.sum()) < total else -1
            room = (row < high) if step > 0 else (row > low)
            gap = (wanted - row) * step
            row[gap.masked_fill(~room, -math.inf).argmax()] += step
    return counts


def calibrate_head_budgets(model: GPT, tokens: torch.Tensor, labels: list[int], policy: Policy,
                           batch_size: int = 8,
                           on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Per-head budgets [lines - 1, L, Hkv] for `policy` from images `tokens` [B, h, w] of
    classes `labels`: the pooled oracle's mean counts, rounded (`static_budgets`)."""
    kept = None
    for start in range(0, len(labels), batch_size):
        chunk = slice(start, start + batch_size)
        future = future_attention(model, tokens[chunk], labels[chunk])
        counted = kept_per_head(oracle_visibility(future, policy, "pooled"), policy)
        kept = counted if kept is None else kept + counted
        if on_batch is not None:
            on_batch(len(labels[chunk]))
    return static_budgets(kept / len(labels), policy)
