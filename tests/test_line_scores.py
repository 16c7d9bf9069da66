"""LineAR's line-end score (models: line_scores) against the scores the steps used to sum.

The reference is the scored step (`step(score_position_ids=...)`): each step of the line
measures its query's mass, rotated to the lookahead positions, and the host sums them. The
line-end score must give the same mass from the line's stored queries, computed once.
"""

from __future__ import annotations

import pytest
import torch
from test_gpt import random_sequence

from linear_export.models import GPT

from conftest import tiny_model


def summed_step_scores(model: GPT, ids, positions, shifts, queries_kept, slot_owner=None):
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
    pool = {} if slot_owner is None else {"slot_owner": slot_owner}
    out = model.step(ids[:, :prefix], positions[:, :prefix], past_key, past_value,
                     torch.tensor(0), **pool)
    past_key[:, :, :, :prefix], past_value[:, :, :, :prefix] = out[1], out[2]
    queries = []
    for index in range(width):
        start = prefix + index
        step_ids, step_pos = ids[:, start:start + 1], positions[:, start:start + 1]
        score_pos = step_pos[:, None] + shifts.view(1, -1, 1)
        out = model.step(step_ids, step_pos, past_key, past_value, torch.tensor(start),
                         score_position_ids=score_pos, **pool)
        decoded = model.decode(step_ids, step_pos, past_key, past_value, torch.tensor(start),
                               **pool)
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


def test_line_scores_of_a_head_shared_pool() -> None:
    """A pool whose slots were handed between kv heads: each slot's mass from its owner."""
    model = tiny_model("GPT-tiny-gqa", height=6, width=4)
    config, layout = model.config, model.layout
    ids, positions = random_sequence(model, batch=2)
    capacity = layout.prefix + layout.width + 2
    owner = torch.arange(config.kv_heads).view(1, 1, -1, 1).repeat(config.n_layer, 2, 1,
                                                                   capacity)
    owner[:, :, 0, 0] = 1  # head 0's prefix slot holds head 1's keys: an uneven pool
    shifts = torch.tensor([4, 8])
    with torch.no_grad():
        keys, cache_len, expected, queries = summed_step_scores(model, ids, positions, shifts,
                                                                4, owner)
        got = model.line_scores(queries, shifts, keys, cache_len, owner)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
