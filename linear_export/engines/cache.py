"""The fixed-capacity KV cache pool: allocate once, append at cache_len, gather-and-compact."""

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
    """Keys (post-RoPE) and values [L, B, Hkv, C, D], the sequence position each slot holds
    and its owner: the kv head whose keys it holds.

    Slots [0, cache_len) are live and `cache_len` is the same for every (layer, row, head):
    every eviction keeps the same number of slots everywhere and compacts them to the front,
    so new tokens always land at `cache_len`, in their own head's row.

    One mechanism for both layouts: a plain cache is the pool whose owners are the identity
    (row r's slots are head r's), held as a stride-0 view, never allocated or moved. With
    `head_shared`, the kv heads of a layer share its Hkv * C slots and the owners are a real
    tensor, so one head may keep more than C slots and another fewer.
    """

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: str | torch.device = "cpu",
                 head_shared: bool = False):
        self.shape, self.dtype, self.head_shared = shape, dtype, head_shared
        dims = (shape.n_layer, shape.batch, shape.n_kv_head, shape.capacity)
        self.key = torch.zeros(*dims, shape.head_dim, dtype=dtype, device=device)
        self.value = torch.zeros_like(self.key)
        self.positions = torch.full(dims, -1, dtype=torch.long, device=device)
        rows = torch.arange(shape.n_kv_head, device=device).view(1, 1, -1, 1)
        self.owner = rows.expand(dims).contiguous() if head_shared else rows.expand(dims)
        self.cache_len = 0
        self.peak_len = 0
        self._scratch: torch.Tensor | None = None  # compaction's, one layer (_move_slots)

    @property
    def shared_owner(self) -> torch.Tensor | None:
        """What a head-shared step graph's slot_owner input reads; None for a plain cache, whose
        step is the other graph (models.attention.cached_attention says why there are two)."""
        return self.owner if self.head_shared else None

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
        """Keep the live slots `keep`, moved to the front, each with its owner.

        `keep` [L, B, Hkv * K]: indices into a layer's live slots read row by row (row r's
        slot c is r * cache_len + c), in any mix of owners (a head-shared cache only); they
        are laid out row by row again, K per row. `keep` [L, B, Hkv, K]: each row keeps K of
        its own slots (indices into them), the same thing with the identity's owners.
        `per_slot` tensors [L, B, Hkv, C] (e.g. accumulated scores) move the same way, in
        place. One gather per tensor; runs once per image line, not per step.
        """
        batch, heads, live = self.shape.batch, self.shape.n_kv_head, self.cache_len
        if keep.dim() == 4:  # each row's own slots: its row is known, no integer division
            kept = keep.shape[-1]
            rows = torch.arange(batch * heads, device=keep.device).view(1, batch, heads, 1)
            offsets = rows * self.capacity + keep

            def take(tensor: torch.Tensor) -> torch.Tensor:
                return torch.gather(tensor[..., :live], 3, keep)
        elif not self.head_shared:
            raise ValueError("slots kept across rows need a cache made with head_shared=True")
        elif keep.shape[-1] % heads:
            raise ValueError(f"{keep.shape[-1]} kept slots do not fill {heads} rows evenly")
        else:
            kept = keep.shape[-1] // heads
            rows = torch.arange(batch, device=keep.device).view(1, -1, 1) * heads + keep // live
            offsets = (rows * self.capacity + keep % live).unflatten(2, (heads, kept))

            def take(tensor: torch.Tensor) -> torch.Tensor:
                pool = tensor[..., :live].flatten(2, 3)
                return torch.gather(pool, 2, keep).unflatten(2, (heads, kept))
        self._move_slots(offsets)
        for tensor in (self.positions, *per_slot) + ((self.owner,) if self.head_shared else ()):
            tensor[..., :kept] = take(tensor)
            if tensor is self.owner:  # new tokens land in their own head's row
                tensor[..., kept:] = torch.arange(heads, device=tensor.device)[:, None]
            else:
                tensor[..., kept:] = -1 if tensor is self.positions else 0
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
