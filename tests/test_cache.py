"""The KV cache: append at each head's length, gather-and-compact, byte accounting."""

from __future__ import annotations

import pytest
import torch

from linear_export.engines.cache import CacheShape, KVCache, kv_bytes


def make_cache(capacity: int = 6) -> KVCache:
    return KVCache(CacheShape(n_layer=2, batch=3, n_kv_head=2, capacity=capacity, head_dim=4),
                   torch.float32)


def test_bytes_follow_the_formula() -> None:
    cache = make_cache(capacity=6)
    assert cache.nbytes == 2 * 2 * 3 * 2 * 6 * 4 * 4
    assert cache.nbytes == cache.key.nbytes + cache.value.nbytes
    assert kv_bytes(12, 16, 12, 257, 64, torch.float16) == 2 * 12 * 16 * 12 * 257 * 64 * 2


def test_append_writes_at_cache_len_and_refuses_overflow() -> None:
    cache = make_cache(capacity=4)
    first = torch.randn(2, 3, 2, 3, 4)
    cache.append(first, -first, torch.tensor([0, 1, 2]))
    second = torch.randn(2, 3, 2, 1, 4)
    cache.append(second, -second, torch.tensor([7]))
    assert cache.cache_len == 4 and cache.peak_len == 4
    assert torch.equal(cache.key[:, :, :, :3], first)
    assert torch.equal(cache.value[:, :, :, 3:], -second)
    assert cache.positions[0, 0, 0].tolist() == [0, 1, 2, 7]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.append(second, second, torch.tensor([8]))


def test_compact_moves_kept_slots_to_the_front_per_head() -> None:
    cache = make_cache(capacity=6)
    keys = torch.randn(2, 3, 2, 5, 4)
    cache.append(keys, keys * 2, torch.arange(5))
    scores = torch.arange(2 * 3 * 2 * 6, dtype=torch.float).view(2, 3, 2, 6)
    original_scores = scores.clone()
    keep = torch.tensor([[0, 2, 4], [1, 3, 4]]).expand(2, 3, 2, 3).clone()
    keep[1, 2, 1] = torch.tensor([0, 1, 2])
    cache.compact(keep, scores)
    assert cache.cache_len == 3
    for layer in range(2):
        for row in range(3):
            for head in range(2):
                slots = keep[layer, row, head]
                assert torch.equal(cache.key[layer, row, head, :3], keys[layer, row, head, slots])
                assert torch.equal(cache.value[layer, row, head, :3],
                                   2 * keys[layer, row, head, slots])
                assert cache.positions[layer, row, head, :3].tolist() == slots.tolist()
                assert torch.equal(scores[layer, row, head, :3],
                                   original_scores[layer, row, head, slots])
    assert torch.all(cache.positions[..., 3:] == -1)
    assert torch.all(scores[..., 3:] == 0)
    new = torch.randn(2, 3, 2, 1, 4)
    cache.append(new, new, torch.tensor([9]))
    assert torch.equal(cache.key[:, :, :, 3:4], new)


def test_heads_keep_their_own_counts_and_the_rest_of_their_rows_is_dead() -> None:
    """Per-head budgets: a head that keeps fewer ends its row of `keep` with -1s; its slots
    from its count up to cache_len are dead (position -1), and new tokens land at cache_len
    in every head."""
    cache = KVCache(CacheShape(n_layer=2, batch=3, n_kv_head=2, capacity=6, head_dim=4),
                    torch.float32, head_shared=True)
    keys = torch.randn(2, 3, 2, 5, 4)
    cache.append(keys, keys * 2, torch.arange(5))
    scores = torch.randn(2, 3, 2, 6)
    original_scores = scores.clone()
    keep = torch.tensor([[0, 2, 4], [1, 3, -1]]).expand(2, 3, 2, 3).clone()
    keep[1, 0] = torch.tensor([[4, -1, -1], [0, 1, 2]])  # head 0 keeps 1, head 1 keeps 3
    cache.compact(keep, scores)
    assert cache.cache_len == 3
    for layer in range(2):
        for row in range(3):
            for head in range(2):
                count = int((keep[layer, row, head] >= 0).sum())
                slots = keep[layer, row, head, :count]
                assert torch.equal(cache.key[layer, row, head, :count],
                                   keys[layer, row, head, slots])
                assert torch.equal(cache.value[layer, row, head, :count],
                                   2 * keys[layer, row, head, slots])
                assert cache.positions[layer, row, head].tolist() == slots.tolist() + [-1] * (
                    6 - count)
                assert torch.equal(scores[layer, row, head, :count],
                                   original_scores[layer, row, head, slots])
                assert torch.all(scores[layer, row, head, count:] == 0)
    new = torch.randn(2, 3, 2, 1, 4)
    cache.append(new, -new, torch.tensor([9]))
    assert cache.cache_len == 4 and torch.equal(cache.key[:, :, :, 3:4], new)
    assert cache.positions[1, 0].tolist() == [[4, -1, -1, 9, -1, -1], [0, 1, 2, 9, -1, -1]]
    with pytest.raises(ValueError, match="head_shared=True"):
        make_cache().compact(torch.tensor([0, -1]).expand(2, 3, 2, 2))
