"""The fixed-capacity KV cache: allocate once, append at cache_len, gather-and-compact."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_bytes(
    n_layer: int, batch: int, n_kv_head: int, capacity: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes of keys plus values: 2 * n_layer * B * n_kv_head * C * head_dim * bytes_per_elem."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layer * batch * n_kv_head * capacity * head_dim * element


@dataclass(frozen=True)
class CacheShape:
    n_layer: int
    batch: int  # rows, CFG's uncond rows included
    n_kv_head: int
    capacity: int
    head_dim: int

    def nbytes(self, dtype: torch.dtype) -> int:
        return kv_bytes(self.n_layer, self.batch, self.n_kv_head, self.capacity, self.head_dim,
                        dtype)


class KVCache:
    """Keys (post-RoPE) and values [L, B, Hkv, C, D], and the sequence position each slot
    holds (-1: none).

    Slots [0, cache_len) are live and new tokens land at `cache_len`, in every (layer, row,
    kv head) at once. Every eviction compacts each head's kept slots to the front of its row.
    In a plain cache every head keeps the same number, so nothing below cache_len is dead.
    With `head_shared` (per-head budgets) a layer's kv heads keep different numbers:
    cache_len is the largest, and a head that keeps fewer has dead slots (position -1) from
    its count up to cache_len, which attention masks (the step's slot_positions input).
    """

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: str | torch.device = "cpu",
                 head_shared: bool = False):
        self.shape, self.dtype, self.head_shared = shape, dtype, head_shared
        dims = (shape.n_layer, shape.batch, shape.n_kv_head, shape.capacity)
        self.key = torch.zeros(*dims, shape.head_dim, dtype=dtype, device=device)
        self.value = torch.zeros_like(self.key)
        # Updated in place, so engines bind it once (a head-shared step's slot_positions).
        self.positions = torch.full(dims, -1, dtype=torch.long, device=device)
        self.cache_len = 0
        self.peak_len = 0
        self._scratch: torch.Tensor | None = None  # compaction's, one layer (_move_slots)

    @property
    def shared_positions(self) -> torch.Tensor | None:
        """What a head-shared step's slot_positions input reads; None for a plain cache, whose
        step takes no such input."""
        return self.positions if self.head_shared else None

    @property
    def capacity(self) -> int:
        return self.shape.capacity

    @property
    def nbytes(self) -> int:
        """Allocated K/V bytes (the whole capacity, live or not)."""
        return self.shape.nbytes(self.dtype)

    def cache_len_tensor(self) -> torch.Tensor:
        return torch.tensor(self.cache_len, dtype=torch.long, device=self.key.device)

    def append(
        self, present_key: torch.Tensor, present_value: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Write a step's new keys/values [L, B, Hkv, T, D] into slots [cache_len, cache_len+T)."""
        steps = present_key.shape[3]
        end = self.cache_len + steps
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, capacity {self.capacity}")
        self.key[:, :, :, self.cache_len:end].copy_(present_key)
        self.value[:, :, :, self.cache_len:end].copy_(present_value)
        self.positions[:, :, :, self.cache_len:end] = positions.to(self.positions.device)
        self.cache_len = end
        self.peak_len = max(self.peak_len, end)

    def compact(self, keep: torch.Tensor, *per_slot: torch.Tensor) -> None:
        """Keep the live slots `keep` [L, B, Hkv, K], moved to the front of each head's row.

        `keep` holds indices into each head's own live slots, ascending; a head that keeps
        fewer than K (per-head budgets, a head-shared cache only) ends its row with -1s, and
        its slots from its count to K are then dead. `per_slot` tensors [L, B, Hkv, C] (e.g.
        accumulated scores) move the same way, in place. One gather per tensor; runs once per
        image line, not per step.
        """
        batch, heads, kept = self.shape.batch, self.shape.n_kv_head, keep.shape[-1]
        dropped = keep < 0
        if not self.head_shared and bool(dropped.any()):
            raise ValueError("heads that keep different numbers of slots need a cache made "
                             "with head_shared=True")
        keep = keep.clamp(min=0)
        rows = torch.arange(batch * heads, device=keep.device).view(1, batch, heads, 1)
        self._move_slots(rows * self.capacity + keep)
        for tensor in (self.positions, *per_slot):
            empty = -1 if tensor is self.positions else 0
            tensor[..., :kept] = torch.gather(tensor[..., :self.cache_len], 3, keep).masked_fill(
                dropped, empty)
            tensor[..., kept:] = empty
        self.cache_len = kept

    def _move_slots(self, offsets: torch.Tensor) -> None:
        """Slot k of every (layer, row, head) of keys and values takes the slot at `offsets`
        [L, B, Hkv, K] (flat indices into that layer's B * Hkv * C slots).

        A layer at a time, rows of D values gathered into a reused scratch layer and copied
        back: a fresh cache-sized tensor per line end costs more in page faults than the
        copy itself (GPT-B, 16 rows: 40 ms per line end with torch.gather, 10 ms this way).
        The scratch is one layer of one of K/V: 1 / (2 L) of the cache's bytes.
        """
        kept, dim = offsets.shape[-1], self.shape.head_dim
        needed = offsets[0].numel()
        if self._scratch is None or self._scratch.shape[0] < needed:
            self._scratch = self.key.new_empty(self.key[0].numel() // dim, dim)
        scratch = self._scratch[:needed]
        for cache in (self.key, self.value):
            for layer, flat in zip(cache, offsets, strict=True):
                torch.index_select(layer.view(-1, dim), 0, flat.reshape(-1), out=scratch)
                layer[:, :, :kept].copy_(scratch.view(*flat.shape, dim))
