"""LineAR's line-end score (models: line_scores) against the scores the steps used to sum.

The reference is the scored step (`step(score_position_ids=...)`): each step of the line
measures its query's mass, rotated to the lookahead positions, and the host sums them. The
line-end score must give the same mass from the line's stored queries, computed once.
"""

from __future__ import annotations

import pytest
import torch
from test_gpt import random_sequence

from linear_export.engines.cache import CacheShape, KVCache
from linear_export.engines.torch import TorchEngine
from linear_export.models import GPT

from conftest import tiny_model


def summed_step_scores(model: GPT, ids, positions, shifts, queries_kept):
    """Decode the first image line token by token with the scored step; return the cache,
    the mass the line's last `queries_kept` queries gave (folded per kv head) and their
    post-RoPE queries from decode()."""
    config, layout = model.config, model.layout
    batch, prefix, width = ids.shape[0], layout.prefix, layout.width
    capacity = prefix + width + 2
    shape = (config.n_layer, batch, config.kv_heads, capacity, config.head_dim)
    past_key, past_value = torch.zeros(shape), torch.zeros(shape)
    group = config.n_head // config.kv_heads
    mass = torch.zeros(config.n_layer, batch, config.kv_heads, capacity)
    out = model.step(ids[:, :prefix], positions[:, :prefix], past_key, past_value,
                     torch.tensor(0))
    past_key[:, :, :, :prefix], past_value[:, :, :, :prefix] = out[1], out[2]
    queries = []
    for index in range(width):
        start = prefix + index
        step_ids, step_pos = ids[:, start:start + 1], positions[:, start:start + 1]
        score_pos = step_pos[:, None] + shifts.view(1, -1, 1)
        out = model.step(step_ids, step_pos, past_key, past_value, torch.tensor(start),
                         score_position_ids=score_pos)
        decoded = model.decode(step_ids, step_pos, past_key, past_value, torch.tensor(start))
        torch.testing.assert_close(decoded[0], out[0], atol=1e-5, rtol=0)
        if index >= width - queries_kept:
            mass += out[3].view(*mass.shape[:3], group, capacity).sum(3)
            queries.append(decoded[3])
        past_key[:, :, :, start:start + 1], past_value[:, :, :, start:start + 1] = out[1], out[2]
    return past_key, torch.tensor(prefix + width), mass, torch.cat(queries, dim=3)


@pytest.mark.parametrize("name", ["GPT-tiny", "GPT-tiny-gqa"])
@pytest.mark.parametrize(("lookahead", "queries_kept"), [(0, 4), (3, 4), (2, 2)])
def test_line_scores_equal_summed_step_scores(name: str, lookahead: int,
                                              queries_kept: int) -> None:
    model = tiny_model(name, height=6, width=4)
    ids, positions = random_sequence(model, batch=3)
    width = model.layout.width
    # Moved 1..lookahead lines down (the last image line at most), as Policy.score_shifts.
    shifts = torch.tensor([min(lines, 5) * width for lines in range(1, lookahead + 1)] or [0])
    with torch.no_grad():
        keys, cache_len, expected, queries = summed_step_scores(model, ids, positions, shifts,
                                                                queries_kept)
        got = model.line_scores(queries, shifts, keys, cache_len)
    assert got.shape == expected.shape
    assert expected[..., : int(cache_len) - 1].abs().sum() > 0  # something to compare
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_line_scores_with_dead_slots() -> None:
    """Kv heads that kept different slots of the first line (the rest dead, per-head
    budgets): the line-end score still equals the summed step scores, and gives dead slots
    nothing."""
    model = tiny_model("GPT-tiny-gqa", height=6, width=4)
    config, layout, engine = model.config, model.layout, TorchEngine(model)
    layers, heads, width = config.n_layer, config.kv_heads, layout.width
    group = config.n_head // heads
    ids, positions = random_sequence(model, batch=2)
    first = layout.prefix + width
    capacity = first + width + 1
    cache = KVCache(CacheShape(layers, 2, heads, capacity, config.head_dim), torch.float32,
                    head_shared=True)
    out = engine.step(ids[:, :first], positions[:, :first], cache)
    cache.append(out.present_key, out.present_value, torch.arange(first))
    keep = torch.arange(first).repeat(layers, 2, heads, 1)
    keep[:, :, 0] = torch.tensor([*range(first - 2), -1, -1])  # kv head 0 drops two slots
    keep[:, 1, 1] = torch.tensor([*range(1, first), -1])  # row 1's head 1 drops its first
    cache.compact(keep)
    shifts = torch.tensor([4, 8])
    expected, queries = torch.zeros(layers, 2, heads, capacity), []
    with torch.no_grad():
        for index in range(first, first + width):
            step_ids, step_pos = ids[:, index:index + 1], positions[:, index:index + 1]
            scored = engine.step(step_ids, step_pos, cache, need_scores=True,
                                 score_position_ids=step_pos[:, None] + shifts.view(1, -1, 1))
            expected += scored.attn_mass.view(layers, 2, heads, group, capacity).sum(3)
            decoded = engine.step(step_ids, step_pos, cache)
            torch.testing.assert_close(decoded.logits, scored.logits, atol=1e-5, rtol=0)
            queries.append(decoded.present_query.clone())
            cache.append(decoded.present_key, decoded.present_value, step_pos[0])
        got = engine.score_line(torch.cat(queries, dim=3), shifts, cache)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    dead = cache.positions < 0
    assert dead[:, :, 0, first - 2:first].all() and torch.all(got[dead] == 0)
    assert torch.all(got[:, :, :, :first - 2][~dead[:, :, :, :first - 2]] > 0)
