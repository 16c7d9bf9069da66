"""Policies: what each keeps at a line end, checked against independent selections."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linear_export.engines.cache import CacheShape, KVCache
from linear_export.errors import UserError
from linear_export.models.attention import MAX_LOOKAHEAD
from linear_export.models.configs import SequenceLayout
from linear_export.runtime.policies import Policy, PolicyConfig

LAYOUT = SequenceLayout(prefix=2, height=6, width=4)


def live_state(layout: SequenceLayout, lines: int, shape=(2, 2, 3)):
    """Positions of a cache holding the prefix and the first `lines` lines, and random scores."""
    count = layout.prefix + lines * layout.width
    positions = torch.arange(count).expand(*shape, count).clone()
    scores = torch.rand(*shape, count)
    return positions, scores


def kept_positions(positions, keep):
    return torch.gather(positions, -1, keep)


def test_linear_keeps_prefix_recent_lines_and_top_scored_mid_tokens() -> None:
    policy = Policy(PolicyConfig("linear", budget=10, recent_lines=1, anchor=1), LAYOUT)
    positions, scores = live_state(LAYOUT, lines=3)  # 12 image tokens > budget 10
    keep = policy.select(positions, scores, finished_line=2, cfg=False)
    assert keep.shape[-1] == LAYOUT.prefix + 10
    kept = kept_positions(positions, keep)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in positions.shape[:-1])):
        row = kept[tuple(index)].tolist()
        must = [0, 1, 2] + list(range(2 + 8, 2 + 12))  # prefix, anchor, last line
        assert set(must) <= set(row)
        mid = [p for p in range(3, 10)]  # image tokens 1..7 compete on score
        ranked = sorted(mid, key=lambda p: -scores[tuple(index)][p].item())
        assert sorted(p for p in row if p in mid) == sorted(ranked[: 10 - 5])
    assert torch.all(keep[..., 1:] > keep[..., :-1])  # ascending, no duplicates


def test_linear_no_eviction_within_budget() -> None:
    policy = Policy(PolicyConfig("linear", budget=8), LAYOUT)
    positions, scores = live_state(LAYOUT, lines=2)
    assert policy.select(positions, scores, finished_line=1, cfg=False) is None


def test_linear_per_layer_and_cfg_share_select_once() -> None:
    config = PolicyConfig("linear", budget=8, granularity="layer", cfg_share=True)
    policy = Policy(config, LAYOUT)
    positions, scores = live_state(LAYOUT, lines=3, shape=(2, 4, 3))
    keep = policy.select(positions, scores, finished_line=2, cfg=True)
    assert torch.equal(keep, keep[:, :, :1].expand_as(keep))  # same for every head
    assert torch.equal(keep[:, :2], keep[:, 2:])  # cond rows == uncond rows
    # The shared choice follows the pooled score.
    pooled = (scores[:, :2] + scores[:, 2:]).sum(2)[0, 0]
    mid = list(range(2, 2 + 8))
    expected = sorted(sorted(mid, key=lambda p: -pooled[p].item())[:4])
    chosen = [p for p in keep[0, 0, 0].tolist() if p in mid]
    assert chosen == expected


def test_streaming_keeps_sinks_and_most_recent() -> None:
    policy = Policy(PolicyConfig("streaming", budget=8, sinks=2), LAYOUT)
    positions, scores = live_state(LAYOUT, lines=3)
    kept = kept_positions(positions, policy.select(positions, None, finished_line=2, cfg=False))
    assert kept[0, 0, 0].tolist() == [0, 1, 2, 3] + list(range(8, 14))


def test_window_keeps_last_whole_lines() -> None:
    policy = Policy(PolicyConfig("window", budget=9), LAYOUT)  # 2 whole lines
    assert policy.budget == 8
    positions, _ = live_state(LAYOUT, lines=4)
    kept = kept_positions(positions, policy.select(positions, None, finished_line=3, cfg=False))
    assert kept[1, 1, 2].tolist() == [0, 1] + list(range(10, 18))


def test_h2o_keeps_recent_window_and_heavy_hitters() -> None:
    policy = Policy(PolicyConfig("h2o", budget=6, recent_tokens=3), LAYOUT)
    positions, scores = live_state(LAYOUT, lines=2)
    keep = policy.select(positions, scores, finished_line=1, cfg=False)
    row = kept_positions(positions, keep)[0, 1, 2].tolist()
    heavy = sorted(range(2, 7), key=lambda p: -scores[0, 1, 2, p].item())[:3]
    assert row == sorted([0, 1] + heavy + [7, 8, 9])


def test_capacity_and_score_needs() -> None:
    layout = SequenceLayout(prefix=1, height=16, width=16)
    assert Policy(PolicyConfig("full"), layout).capacity == 257
    linear = Policy(PolicyConfig("linear", budget=64), layout)
    assert linear.capacity == 1 + 64 + 16
    assert linear.score_mode == "line"
    assert not linear.needs_scores(3 * 16 + 5)  # line 3 ends at 64 tokens: no eviction
    assert linear.needs_scores(4 * 16 + 5)
    last_two = Policy(PolicyConfig("linear", budget=64, score_queries=2), layout)
    assert not last_two.needs_scores(4 * 16 + 13) and last_two.needs_scores(4 * 16 + 14)
    assert Policy(PolicyConfig("linear", budget=256), layout).capacity == 257
    assert Policy(PolicyConfig("h2o", budget=64), layout).needs_scores(0)
    assert not Policy(PolicyConfig("streaming", budget=64), layout).needs_scores(100)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (PolicyConfig("nope", budget=4), "Unknown policy"),
        (PolicyConfig("linear", budget=4, recent_lines=2), "smaller than"),
        (PolicyConfig("window", budget=3), "less than one line"),
        (PolicyConfig("streaming", budget=4, sinks=4), "sinks"),
        (PolicyConfig("linear", budget=8, granularity="row"), "granularity"),
    ],
)
def test_impossible_configurations(config: PolicyConfig, match: str) -> None:
    with pytest.raises(UserError, match=match):
        Policy(config, LAYOUT)


def test_linear_recent_lines_default_to_one_then_half_the_budget() -> None:
    layout = SequenceLayout(prefix=1, height=16, width=4)
    chosen = {lines: Policy(PolicyConfig("linear", budget=lines * 4), layout).recent_lines
              for lines in (2, 3, 4, 5, 6, 8, 10)}
    assert chosen == {2: 1, 3: 1, 4: 1, 5: 2, 6: 3, 8: 4, 10: 5}
    with pytest.raises(UserError, match="smaller than the 1 recent line"):  # under a line
        Policy(PolicyConfig("linear", budget=3), layout)
    assert Policy(PolicyConfig("linear", budget=3, recent_lines=0), layout).recent_lines == 0
    assert Policy(PolicyConfig("linear", budget=32, recent_lines=1), layout).recent_lines == 1
    # What select() keeps follows: with 8 lines' budget the 4 newest lines are all there.
    policy = Policy(PolicyConfig("linear", budget=32), layout)
    count = layout.prefix + 10 * layout.width
    positions = torch.arange(count).expand(1, 1, 2, count)
    scores = torch.rand(1, 1, 2, count)
    scores[..., -16:] = 0  # the newest 4 lines look useless to the scores
    keep = positions.gather(-1, policy.select(positions, scores, finished_line=9, cfg=False))
    newest = torch.arange(count - 16, count)
    assert all(bool(torch.isin(newest, row).all()) for row in keep.flatten(0, 2))


def test_linear_lookahead_moves_scoring_queries_down_whole_lines_within_the_image() -> None:
    layout = LAYOUT  # 6 lines of 4 after a prefix of 2: the last image position is 25
    positions = [2, 9, 18, 21, 25]  # lines 0, 1, 4, 4 and 5
    ahead = Policy(PolicyConfig("linear", budget=8, lookahead=2), layout)
    moved = [[position + shift for shift in ahead.score_shifts((position - 2) // 4)]
             for position in positions]
    # One, then two lines down where the image has them, fewer near its end, never another
    # column.
    assert moved == [[6, 10], [13, 17], [22, 22], [25, 25], [25, 25]]
    assert all((to - position) % layout.width == 0
               for position, row in zip(positions, moved, strict=True) for to in row)
    assert Policy(PolicyConfig("linear", budget=8, lookahead=0), layout).score_shifts(0) is None
    assert Policy(PolicyConfig("h2o", budget=8), layout).score_shifts(0) is None
    for bad in (-1, MAX_LOOKAHEAD + 1):
        with pytest.raises(UserError, match=f"--lookahead {bad} is out of range"):
            Policy(PolicyConfig("linear", budget=8, lookahead=bad), layout)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(2, 7),
    width=st.integers(1, 5),
    prefix=st.integers(1, 3),
    budget_lines=st.integers(1, 6),
    extra=st.integers(0, 3),
    recent_lines=st.integers(0, 2),
    name=st.sampled_from(["linear", "streaming", "h2o", "window"]),
    granularity=st.sampled_from(["head", "layer"]),
    seed=st.integers(0, 1000),
)
def test_whole_image_never_exceeds_capacity_and_keeps_what_policies_promise(
    height, width, prefix, budget_lines, extra, recent_lines, name, granularity, seed
) -> None:
    layout = SequenceLayout(prefix, height, width)
    budget = min(budget_lines * width + extra, layout.image_tokens)
    recent_lines = min(recent_lines, budget // width)
    config = PolicyConfig(name, budget=budget, recent_lines=recent_lines, sinks=0,
                          granularity=granularity)
    if name == "window" and budget < width:
        return
    policy = Policy(config, layout)
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(CacheShape(2, 2, 2, policy.capacity, 1), torch.float32)
    cache.append(torch.zeros(2, 2, 2, prefix, 1), torch.zeros(2, 2, 2, prefix, 1),
                  torch.arange(prefix))
    for token in range(layout.image_tokens):
        value = torch.full((2, 2, 2, 1, 1), float(token))
        cache.append(value, value, torch.tensor([prefix + token]))
        assert cache.cache_len <= policy.capacity
        if (token + 1) % width:
            continue
        line = token // width
        live = cache.positions[..., : cache.cache_len]
        scores = torch.rand(live.shape, generator=generator)
        keep = policy.select(live, scores, finished_line=line, cfg=False)
        if keep is not None:
            cache.compact(keep)
        held = cache.positions[..., : cache.cache_len]
        images = min(policy.budget, token + 1)
        assert cache.cache_len == prefix + images
        # Values travel with their positions through every compaction.
        assert torch.equal(cache.value[..., : cache.cache_len, 0],
                           (held - prefix).clamp(min=0).float())
        for position in range(prefix):  # the prefix always stays
            assert torch.all((held == position).any(-1))
        if name == "linear":
            first_recent = prefix + max(0, (line + 1 - recent_lines) * width)
            for position in range(first_recent, prefix + token + 1):
                assert torch.all((held == position).any(-1))
        if name in ("streaming", "window"):
            newest = prefix + token + 1 - images
            expected = list(range(prefix)) + list(range(newest, prefix + token + 1))
            assert torch.all(held == torch.tensor(expected))
        if granularity == "layer" and name in ("linear", "h2o"):
            assert torch.equal(held, held[:, :, :1].expand_as(held))


def test_lookahead_defaults_to_three_lines_and_four_with_head_budgets() -> None:
    layout = SequenceLayout(prefix=1, height=6, width=4)
    table = torch.full((5, 2, 2), 8)
    table[0] = 4
    plain = Policy(PolicyConfig("linear", budget=8), layout)
    pooled = Policy(PolicyConfig("linear", budget=8, head_budgets=table), layout)
    chosen = Policy(PolicyConfig("linear", budget=8, head_budgets=table, lookahead=2), layout)
    assert (plain.lookahead, pooled.lookahead, chosen.lookahead) == (3, 4, 2)
    assert pooled.score_shifts(0) == [4, 8, 12, 16] and plain.score_shifts(0) == [4, 8, 12]
    assert pooled.score_shifts(3) == [4, 8, 8, 8]  # never past the last line


def prior_policy(weight: float, layout: SequenceLayout = LAYOUT, heads: int = 3):
    """LineAR at budget 10 with equal head budgets and a random position prior."""
    lines, layers = layout.height - 1, 2
    table = torch.tensor([min((line + 1) * layout.width, 10) for line in range(lines)])
    table = table.view(-1, 1, 1).expand(lines, layers, heads).clone()
    prior = torch.rand(lines, layers, heads, layout.image_tokens)
    prior = prior / prior.sum(-1, keepdim=True)
    return Policy(PolicyConfig("linear", budget=10, recent_lines=1, head_budgets=table,
                               position_prior=prior,
                               prior_weight=torch.full((layers, heads), weight)), layout)


def test_position_prior_weight_zero_keeps_linears_ranking() -> None:
    policy = prior_policy(0.0)
    plain = Policy(PolicyConfig("linear", budget=10, recent_lines=1), LAYOUT)
    positions, scores = live_state(LAYOUT, lines=3)
    assert torch.equal(policy.select(positions, scores, 2, cfg=False),
                       plain.select(positions, scores, 2, cfg=False))


def test_position_prior_alone_keeps_the_prior_top_keys() -> None:
    policy = prior_policy(1e6)
    positions, scores = live_state(LAYOUT, lines=3)
    kept = kept_positions(positions, policy.select(positions, scores, 2, cfg=False))
    prior = policy.config.position_prior[2]
    for layer, batch, head in torch.cartesian_prod(*(torch.arange(n) for n in (2, 2, 3))):
        mid = list(range(0, 8))  # image tokens 0..7 compete; line 2 (8..11) is recent
        ranked = sorted(mid, key=lambda token: -prior[layer, head, token].item())
        chosen = [position - LAYOUT.prefix for position in kept[layer, batch, head].tolist()
                  if 0 <= position - LAYOUT.prefix < 8]
        assert sorted(chosen) == sorted(ranked[:10 - 4])


def test_position_prior_is_weighed_per_head_and_dead_slots_are_never_kept() -> None:
    policy = prior_policy(0.5)
    positions, scores = live_state(LAYOUT, lines=3)
    positions[0, 1, 2, 5], scores[0, 1, 2, 5] = -1, 0.0  # a dead slot of a shorter head
    priority = policy.priority(positions, scores, 2, cfg=False)
    prior, weight = policy.config.position_prior[2], policy.config.prior_weight
    for index in torch.cartesian_prod(*(torch.arange(n) for n in positions.shape)):
        layer, batch, head, slot = index.tolist()
        token = int(positions[layer, batch, head, slot]) - LAYOUT.prefix
        if positions[layer, batch, head, slot] < 0:
            assert priority[layer, batch, head, slot] == -float("inf")
        elif token < 0 or token >= 8:
            assert priority[layer, batch, head, slot] == float("inf")
        else:
            expected = (scores[layer, batch, head, slot] / scores[layer, batch, head].sum()
                        + weight[layer, head] * prior[layer, head, token])
            assert torch.isclose(priority[layer, batch, head, slot], expected)


def test_head_budgets_keep_each_heads_best_count_of_its_own_slots() -> None:
    """Each head keeps its table count of the prefix and image tokens, its best by score
    (the recent line always): an independent sort per head. Fewer than the most: -1s."""
    lines, layers, heads = LAYOUT.height - 1, 2, 3
    table = torch.tensor([min((line + 1) * LAYOUT.width, 8) for line in range(lines)])
    table = table.view(-1, 1, 1).expand(lines, layers, heads).clone()
    table[2:] = torch.tensor([[4, 8, 12], [10, 6, 8]])  # uneven, 24 per layer
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1, head_budgets=table), LAYOUT)
    assert policy.capacity == LAYOUT.prefix + 12 + LAYOUT.width
    positions, scores = live_state(LAYOUT, lines=3)
    positions[1, 0, 1, -1], scores[1, 0, 1, -1] = -1, 0.0  # a head that holds one fewer
    keep = policy.select(positions, scores, 2, cfg=False)
    assert keep.shape[-1] == LAYOUT.prefix + 12
    for layer, batch, head in torch.cartesian_prod(*(torch.arange(n) for n in (2, 2, 3))):
        row = keep[layer, batch, head]
        count = int(table[2, layer, head])
        live = [slot for slot in range(positions.shape[-1])
                if positions[layer, batch, head, slot] >= 0]
        always = [slot for slot in live if positions[layer, batch, head, slot] < LAYOUT.prefix
                  or positions[layer, batch, head, slot] >= LAYOUT.prefix + 8]
        rest = sorted((slot for slot in live if slot not in always),
                      key=lambda slot: -scores[layer, batch, head, slot].item())
        expected = sorted(always + rest[:LAYOUT.prefix + count - len(always)])
        assert row.tolist() == expected + [-1] * (len(row) - len(expected))


@pytest.mark.parametrize(("change", "phrase"), [
    ({"prior_weight": None}, "needs its per-head weights"),
    ({"head_budgets": None}, "comes with per-head budgets"),
    ({"prior_weight": torch.zeros(2, 2)}, "calibrate them for this model again"),
])
def test_position_prior_misfits_are_refused(change, phrase) -> None:
    config = prior_policy(1.0).config
    with pytest.raises(UserError, match=phrase):
        Policy(replace(config, **change), LAYOUT)
