"""Attention over an explicit, fixed-capacity KV cache: the core of every family's step."""

from __future__ import annotations

import math

import torch

from .kernels import emits_ort_kernels

# Scoring rotations (LineAR's lookahead lines) a step graph may take: TensorRT profiles and
# the exporter need a bound on score_position_ids' second dimension.
MAX_LOOKAHEAD = 8
DEFAULT_LOOKAHEAD = 3  # LineAR's default (docs/quality.md sweep); TensorRT's optimum for the bound


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    live: torch.Tensor,
    scale: float | None = None,
    score_q: torch.Tensor | None = None,
    with_mass: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attend over live cache slots plus the step's own tokens (causal among them).

    q [B, H, T, D]; k, v [B, Hkv, T, D] (post-RoPE); past_* [B, Hkv, C, D]; live [B or 1, C],
    or [B, Hkv, C] where each kv head holds its own number of slots (per-head budgets).
    Returns the attention output [B, T, H*D] and the mass per past slot [B, H, C] (float32).
    `score_q` [B, H, R, T, D] (default q) are the queries the mass is measured with, summed
    over R rotations: LineAR rotates the step's queries to positions 1..R lines ahead, to rank
    slots by what later lines will read.
    Query heads are grouped by the kv head they share, so the cache is never repeated.
    `with_mass=False`: no mass (None).
    """
    batch, n_head, steps, head_dim = q.shape
    probs = _attention_probs(q, k, past_key, live, scale)
    capacity = past_key.shape[-2]
    past_probs, own_probs = probs[..., :capacity], probs[..., capacity:]
    out = past_probs.to(v.dtype) @ past_value + own_probs.to(v.dtype) @ v
    out = out.view(batch, n_head, steps, head_dim).transpose(1, 2).reshape(batch, steps, -1)
    if not with_mass:
        return out, None
    queries = steps
    if score_q is not None:
        rotations = score_q.shape[2]
        queries = rotations * steps
        # Row r * T + t of the flattened queries is step t: it sees own tokens up to t.
        own_step = torch.arange(steps, device=q.device).expand(rotations, steps).reshape(-1)
        past_probs = _attention_probs(score_q.flatten(2, 3), k, past_key, live, scale,
                                      own_step)[..., :capacity]
    mass = past_probs.view(batch, n_head, queries, capacity).sum(dim=2)
    return out, mass


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, cache_len: torch.Tensor, scale: float,
                     slot_positions: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Attention over the live slots and the step's own tokens, no probabilities kept.

    Shapes as cached_attention's. `slot_positions` [B, Hkv, C]: the sequence position each
    slot holds, -1 for a dead slot below cache_len (per-head budgets: a kv head that keeps
    fewer slots than the longest); None: slots [0, cache_len) all live. Returns the output
    [B, T, H*D] and, only where the export emits the fused kernel, the cache as that kernel
    leaves it (the step's keys and values written at cache_len): graph outputs the engine
    binds to the cache's own buffers, which is what lets the kernel skip the copy. The fused
    kernel takes T > 1 only on an empty cache (prefill); decode steps are T = 1.
    """
    if emits_ort_kernels():
        return _group_query_attention(q, k, v, past_key, past_value, cache_len, scale,
                                      slot_positions)
    live = live_slots(past_key.shape[-2], cache_len, slot_positions)
    out, _ = cached_attention(q, k, v, past_key, past_value, live, scale, with_mass=False)
    return out, None


def _group_query_attention(q, k, v, past_key, past_value, cache_len, scale, slot_positions):
    batch, n_head, steps, head_dim = q.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, heads, T, D] -> [B, T, heads * D]
        return x.transpose(1, 2).reshape(batch, steps, -1)

    total = (cache_len + steps).to(torch.int32)
    seqlens = (total - 1).expand(batch).contiguous()  # the last live slot after this step
    inputs = [flat(q), flat(k), flat(v), past_key, past_value, seqlens, total]
    if slot_positions is not None:  # dead slots: -inf on their scores (attention_bias)
        inputs += [None, None, None, _dead_slot_bias(slot_positions, cache_len, steps, n_head,
                                                     q.dtype)]
    out, key, value = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention", inputs,
        {"num_heads": n_head, "kv_num_heads": k.shape[1], "scale": float(scale)},
        dtypes=(q.dtype, past_key.dtype, past_value.dtype),
        shapes=((batch, steps, n_head * head_dim), past_key.shape, past_value.shape),
        version=1)
    return out, (key, value)


def _dead_slot_bias(slot_positions: torch.Tensor, cache_len: torch.Tensor, steps: int,
                    n_head: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, cache_len + T]: 0, or -inf where a slot below cache_len is dead; the kernel
    wants exactly as many columns as it reads (cache_len + T, known only at run time)."""
    batch, n_kv_head, capacity = slot_positions.shape
    slot = torch.arange(capacity, device=slot_positions.device)
    live = (slot_positions >= 0) | (slot >= cache_len)  # the step's own slots are live
    bias = torch.zeros((), dtype=dtype).masked_fill(~live, -math.inf)  # [B, Hkv, C]
    total = (cache_len + steps).item()
    torch._check(total >= 1)
    torch._check(total <= capacity)
    bias = bias.narrow(-1, 0, total)
    group = n_head // n_kv_head
    return bias[:, :, None, None].expand(-1, -1, group, steps, -1).reshape(batch, n_head, steps,
                                                                         total)


def line_mass(queries: torch.Tensor, past_key: torch.Tensor, cache_len: torch.Tensor,
              scale: float, slot_positions: torch.Tensor | None = None) -> torch.Tensor:
    """The attention mass a finished line's queries gave each live slot, per kv head.

    queries [B, H, R, Q, D]: the line's last Q queries (post-RoPE), each in R rotations;
    query t is the token in slot cache_len - Q + t. It sees the slots up to its own, as the
    step that made it did, and its own slot's mass is left out (the step's own key). With
    `slot_positions` [B, Hkv, C] (per-head budgets) a slot at position -1 is dead and seen
    by none. Returns [B, Hkv, C] float32 summed over queries, rotations and the heads of each
    kv head: what the scored steps of the line summed, computed once.
    """
    batch, n_head, rotations, count, head_dim = queries.shape
    n_kv_head, capacity = past_key.shape[1], past_key.shape[2]
    group = n_head // n_kv_head
    q = queries.reshape(batch, n_kv_head, group * rotations * count, head_dim) * scale
    slot = torch.arange(capacity, device=queries.device)
    own = cache_len - count + torch.arange(count, device=queries.device)  # [Q]
    # Row i of q is query i % Q; it sees slots <= its own.
    own = own.repeat(group * rotations)[:, None]  # [G*R*Q, 1]
    # Masks as additive biases on the small [G*R*Q, C] (and [B, Hkv, 1, C]) shapes, not a
    # select on the scores' full size: the same bits (s + 0 = s, s - inf = -inf), fewer bytes.
    zero = torch.zeros((), dtype=torch.float32, device=queries.device)
    scores = (q @ past_key.transpose(-1, -2)).float()
    scores = scores + zero.masked_fill(slot[None, :] > own, -math.inf)  # causal
    if slot_positions is not None:
        scores = scores + zero.masked_fill(slot_positions[:, :, None, :] < 0, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return (probs * (slot != own)).sum(dim=2)  # an unseen slot's probability is 0 already


def _attention_probs(q: torch.Tensor, k: torch.Tensor, past_key: torch.Tensor,
                     live: torch.Tensor, scale: float | None,
                     own_step: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over [past slots, own tokens], float32, [B, Hkv, G*S, C + T].

    `live` [B or 1, C], or [B or 1, Hkv, C] when each kv head sees its own slots. q has S
    queries; `own_step` [S] says which of the step's T tokens each one is (default:
    S = T, query t is token t), so it sees the step's own tokens up to that one.
    """
    batch, n_head, steps, head_dim = q.shape
    n_kv_head = k.shape[1]
    group = n_head // n_kv_head
    q = q.reshape(batch, n_kv_head, group * steps, head_dim)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    past_scores = ((q * scale) @ past_key.transpose(-1, -2)).float()  # [B, Hkv, G*S, C]
    heads_seen = live.shape[1] if live.dim() == 3 else 1
    past_scores = past_scores.masked_fill(~live.view(live.shape[0], heads_seen, 1, -1),
                                          -math.inf)
    own_scores = ((q * scale) @ k.transpose(-1, -2)).float()  # [B, Hkv, G*S, T]
    if own_step is None:
        causal = torch.ones(steps, steps, dtype=torch.bool, device=q.device).tril()
    else:
        causal = torch.arange(k.shape[2], device=q.device)[None, :] <= own_step[:, None]
    own_scores = own_scores.masked_fill(~causal.repeat(group, 1), -math.inf)
    return torch.softmax(torch.cat([past_scores, own_scores], dim=-1), dim=-1)


def per_slot(slot_positions: torch.Tensor | None) -> dict:
    """A step's keyword arguments for the cache's slot positions: none where every slot
    below cache_len is live (the graphs of such caches, and every family's step, take no
    slot_positions)."""
    return {} if slot_positions is None else {"slot_positions": slot_positions}


def live_slots(capacity: int, cache_len: torch.Tensor,
               slot_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Slot < cache_len: [B or 1, C]; with `slot_positions` [B, Hkv, C] also position >= 0,
    [B, Hkv, C] (a kv head's dead slots, per-head budgets)."""
    live = torch.arange(capacity, device=cache_len.device) < cache_len.reshape(-1, 1)
    if slot_positions is None:
        return live
    return live[:, None, :] & (slot_positions >= 0)
