"""Attention over an explicit, fixed-capacity KV cache: the core of every family's step."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

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
    slot_owner: torch.Tensor | None = None,
    with_mass: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attend over live cache slots plus the step's own tokens (causal among them).

    q [B, H, T, D]; k, v [B, Hkv, T, D] (post-RoPE); past_* [B, Hkv, C, D]; live [B or 1, C].
    Returns the attention output [B, T, H*D] and the mass per past slot [B, H, C] (float32).
    `score_q` [B, H, R, T, D] (default q) are the queries the mass is measured with, summed
    over R rotations: LineAR rotates the step's queries to positions 1..R lines ahead, to rank
    slots by what later lines will read.
    Query heads are grouped by the kv head they share, so the cache is never repeated.

    `slot_owner` [B, Hkv, C] (int64): the head-shared pool, where a slot of row r may hold
    the keys of another kv head (its owner), so heads can keep different numbers of slots.
    Every head then reads all the layer's slots, masked to those it owns; the mass of slot
    (r, c) is reported at query heads r * G .. r * G + G - 1, as if r were its owner, so the
    host folds it per row exactly as without the pool. `with_mass=False`: no mass (None).
    """
    batch, n_head, steps, head_dim = q.shape
    # Two graphs on purpose, though the host has one cache (a plain one is the pool whose
    # owners are the identity, engines/cache.py): through the owner mask every head reads all
    # Hkv * C slots of its layer, ~Hkv x the attention work of reading its own C, and the
    # decode step cannot use ONNX Runtime's GroupQueryAttention, which runs in place on each
    # kv head's own slots (decode_kernel). So slot_owner None exports a graph without it, and
    # only a head-shared build (--head-shared) pays for the pool.
    if slot_owner is not None:
        live, past_key, past_value = _pooled(live, slot_owner, past_key, past_value)
    probs = _attention_probs(q, k, past_key, live, scale)
    capacity = past_key.shape[-2]
    past_probs, own_probs = probs[..., :capacity], probs[..., capacity:]
    out = _one_pool(past_probs.to(v.dtype), past_value) + own_probs.to(v.dtype) @ v
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
    if slot_owner is not None:
        # [B, (owner, G), (row, C)]: only the owner's heads see a slot, the rest add zeros.
        n_kv_head, slots = slot_owner.shape[1:]
        mass = mass.view(batch, n_kv_head, n_head // n_kv_head, n_kv_head, slots).sum(1)
        mass = mass.transpose(1, 2).reshape(batch, n_head, slots)
    return out, mass


# How the decode step's attention is exported: "math" (standard ONNX ops; TensorRT, and the
# head-shared pool) or "gqa", ONNX Runtime's fused com.microsoft.GroupQueryAttention, which
# reads the bound cache directly and writes the step's keys and values into it in place.
ATTENTION_KERNELS = ("gqa", "math")
_EXPORT_KERNEL: ContextVar[str] = ContextVar("attention_kernel", default="math")


@contextmanager
def exporting_attention(kernel: str) -> Iterator[None]:
    """Within, decode_attention() traced by torch.onnx.export emits `kernel`."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; one of {ATTENTION_KERNELS}")
    token = _EXPORT_KERNEL.set(kernel)
    try:
        yield
    finally:
        _EXPORT_KERNEL.reset(token)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, cache_len: torch.Tensor, scale: float,
                     slot_owner: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Attention over the live slots and the step's own tokens, no probabilities kept.

    Shapes as cached_attention's. Returns the output [B, T, H*D] and, only where the export
    emits the fused kernel, the cache as that kernel leaves it (the step's keys and values
    written at cache_len): graph outputs the engine binds to the cache's own buffers, which
    is what lets the kernel skip the copy. The fused kernel takes T > 1 only on an empty cache
    (prefill); decode steps are T = 1. A head-shared pool (`slot_owner`) always takes the
    standard form: the fused kernel has no per-slot owners.
    """
    fused = torch.onnx.is_in_onnx_export() and _EXPORT_KERNEL.get() == "gqa"
    if fused and slot_owner is None:
        return _group_query_attention(q, k, v, past_key, past_value, cache_len, scale)
    live = live_slots(past_key.shape[-2], cache_len)
    out, _ = cached_attention(q, k, v, past_key, past_value, live, scale,
                              slot_owner=slot_owner, with_mass=False)
    return out, None


def _group_query_attention(q, k, v, past_key, past_value, cache_len, scale):
    batch, n_head, steps, head_dim = q.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, heads, T, D] -> [B, T, heads * D]
        return x.transpose(1, 2).reshape(batch, steps, -1)

    total = (cache_len + steps).to(torch.int32)
    seqlens = (total - 1).expand(batch).contiguous()  # the last live slot after this step
    out, key, value = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        (flat(q), flat(k), flat(v), past_key, past_value, seqlens, total),
        {"num_heads": n_head, "kv_num_heads": k.shape[1], "scale": float(scale)},
        dtypes=(q.dtype, past_key.dtype, past_value.dtype),
        shapes=((batch, steps, n_head * head_dim), past_key.shape, past_value.shape),
        version=1)
    return out, (key, value)


def line_mass(queries: torch.Tensor, past_key: torch.Tensor, cache_len: torch.Tensor,
              scale: float, slot_owner: torch.Tensor | None = None) -> torch.Tensor:
    """The attention mass a finished line's queries gave each live slot, per kv head.

    queries [B, H, R, Q, D]: the line's last Q queries (post-RoPE), each in R rotations;
    query t is the token in slot cache_len - Q + t. It sees the slots up to its own, as the
    step that made it did, and its own slot's mass is left out (the step's own key). Returns
    [B, Hkv, C] float32 summed over queries, rotations and the heads of each kv head: what
    the scored steps of the line summed, computed once. With `slot_owner` [B, Hkv, C] (the
    head-shared pool) a slot's mass comes from its owner's heads and is reported in its row.
    """
    batch, n_head, rotations, count, head_dim = queries.shape
    n_kv_head, capacity = past_key.shape[1], past_key.shape[2]
    group = n_head // n_kv_head
    q = queries.reshape(batch, n_kv_head, group * rotations * count, head_dim) * scale
    slot = torch.arange(capacity, device=queries.device)
    own = cache_len - count + torch.arange(count, device=queries.device)  # [Q]
    # Row i of q is query i % Q; it sees slots <= its own.
    own = own.repeat(group * rotations)[:, None]  # [G*R*Q, 1]
    if slot_owner is None:
        keys, seen = past_key, slot[None, :] <= own  # [B, Hkv, C, D]; [G*R*Q, C]
    else:
        keys = past_key.reshape(batch, 1, -1, head_dim)  # the layer's pool
        heads = torch.arange(n_kv_head, device=queries.device).view(1, -1, 1, 1)
        owned = slot_owner.reshape(batch, 1, 1, -1) == heads  # [B, Hkv, 1, Hkv * C]
        seen = owned & (slot.repeat(n_kv_head)[None, :] <= own)[None, None]
    scores = _one_pool(q, keys.transpose(-1, -2)).float()
    probs = torch.softmax(scores.masked_fill(~seen, -math.inf), dim=-1)
    left_out = seen & (slot.repeat(keys.shape[2] // capacity)[None, :] != own)
    mass = (probs * left_out).sum(dim=2)  # [B, Hkv, C] or [B, Hkv (owner), Hkv * C]
    if slot_owner is None:
        return mass
    # Each slot's mass from its owner's heads, in its own row.
    return mass.gather(1, slot_owner.reshape(batch, 1, -1)).view(batch, n_kv_head, capacity)


def _pooled(live: torch.Tensor, slot_owner: torch.Tensor, past_key: torch.Tensor,
            past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's slots as one pool [B, 1, Hkv * C, D] and, per kv head, the live slots it
    owns [B, Hkv, Hkv * C]."""
    batch, n_kv_head, capacity = slot_owner.shape
    heads = torch.arange(n_kv_head, device=slot_owner.device).view(1, -1, 1)
    owned = slot_owner.reshape(batch, 1, -1) == heads
    live_rows = live.view(live.shape[0], 1, capacity).expand(-1, n_kv_head, -1)
    visible = owned & live_rows.reshape(live.shape[0], 1, -1)
    return (visible, past_key.reshape(batch, 1, -1, past_key.shape[-1]),
            past_value.reshape(batch, 1, -1, past_value.shape[-1]))


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
    past_scores = _one_pool(q * scale, past_key.transpose(-1, -2)).float()  # [B, Hkv, G*S, C]
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


def _one_pool(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left [B, Hkv, S, K] @ right [B, Hkv or 1, K, N]. With one shared pool (1), all heads'
    rows go through one matmul: broadcasting would copy the pool once per kv head."""
    if right.shape[1] == 1 and left.shape[1] > 1:
        batch, heads, rows, _ = left.shape
        return (left.reshape(batch, 1, heads * rows, -1) @ right).view(batch, heads, rows, -1)
    return left @ right


def pool_args(slot_owner: torch.Tensor | None) -> dict:
    """A step's keyword arguments for a head-shared pool's owners: none for a plain cache,
    whose step (and every family's step without a pool) does not take slot_owner."""
    return {} if slot_owner is None else {"slot_owner": slot_owner}


def live_slots(capacity: int, cache_len: torch.Tensor) -> torch.Tensor:
    """[B or 1, C] bool: slot < cache_len."""
    return torch.arange(capacity, device=cache_len.device) < cache_len.reshape(-1, 1)
