"""The cache pool: append at cache_len, gather-and-compact, byte accounting."""

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


def test_compact_across_rows_lays_kept_slots_row_by_row_with_their_owners() -> None:
    cache = KVCache(CacheShape(n_layer=2, batch=3, n_kv_head=2, capacity=6, head_dim=4),
                    torch.float32, head_shared=True)
    assert cache.owner[1, 2].tolist() == [[0] * 6, [1] * 6]
    keys = torch.randn(2, 3, 2, 5, 4)
    cache.append(keys, keys * 2, torch.arange(5))
    scores = torch.randn(2, 3, 2, 6)
    original_scores = scores.clone()
    # 6 of the 10 live slots per (layer, row): head 0 keeps 4, head 1 keeps 2 (flat r * 5 + c).
    keep = torch.tensor([0, 1, 3, 4, 6, 9]).expand(2, 3, 6).clone()
    keep[1, 0] = torch.tensor([2, 5, 6, 7, 8, 9])  # head 0 keeps 1, head 1 keeps 5
    cache.compact(keep, scores)
    assert cache.cache_len == 3
    for layer in range(2):
        for row in range(3):
            for index, flat in enumerate(keep[layer, row].tolist()):
                head, slot = divmod(flat, 5)
                new_row, new_slot = divmod(index, 3)
                assert torch.equal(cache.key[layer, row, new_row, new_slot],
                                   keys[layer, row, head, slot])
                assert torch.equal(cache.value[layer, row, new_row, new_slot],
                                   2 * keys[layer, row, head, slot])
                assert cache.owner[layer, row, new_row, new_slot] == head
                assert cache.positions[layer, row, new_row, new_slot] == slot
                assert scores[layer, row, new_row, new_slot] == original_scores[layer, row, head,
                                                                                slot]
    assert cache.owner[1, 0, :, :3].tolist() == [[0, 1, 1], [1, 1, 1]]
    # The free tail is each row's own again, for the tokens that land there next.
    assert cache.owner[..., 3:].tolist() == KVCache(cache.shape, torch.float32,
                                                    head_shared=True).owner[..., 3:].tolist()
    assert torch.all(cache.positions[..., 3:] == -1) and torch.all(scores[..., 3:] == 0)
    with pytest.raises(ValueError, match="evenly"):
        cache.compact(keep[..., :5])
