"""evaluation/oracle.py: the oracle's evictions, and the per-head budgets calibrated from it."""

from __future__ import annotations

import pytest
import torch

from linear_export.engines.torch import TorchEngine
from linear_export.evaluation.oracle import (
    calibrate_head_budgets,
    future_attention,
    kept_per_head,
    line_scores,
    oracle_visibility,
    round_per_layer,
    static_budgets,
)
from linear_export.runtime.generate import generate
from linear_export.runtime.policies import Policy, PolicyConfig
from linear_export.runtime.sampling import SamplingConfig

from conftest import tiny_model


@pytest.fixture(scope="module")
def subject():
    return oracle_subject()


def oracle_subject():
    """A tiny model on a 4 x 4 grid, three teacher-forced images and their future attention."""
    model = tiny_model(height=4, width=4)
    labels = [1, 3, 5]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (3, 16), generator=generator)
    return model, labels, tokens, future_attention(model, tokens, labels)


def test_fixed_budgets_equal_to_the_budget_are_the_uniform_oracle(subject):
    model, labels, tokens, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    table = torch.full((3, model.config.n_layer, model.config.kv_heads), 8)
    uniform = oracle_visibility(future, policy, "uniform")
    assert torch.equal(oracle_visibility(future, policy, table), uniform)


def test_fixed_budgets_give_each_head_its_count(subject):
    model, labels, tokens, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    layers, heads = model.config.n_layer, model.config.kv_heads
    table = torch.full((3, layers, heads), 8)
    table[2, :, 0], table[2, :, 1] = 11, 5  # after line 2: 12 image tokens cached
    visible = oracle_visibility(future, policy, table)
    first_query_of_line_3 = 1 + 3 * 4
    seen = visible[..., first_query_of_line_3, 1:first_query_of_line_3].sum(-1)  # [L, B, H]
    expected = table[2][:, None, :].expand(layers, 3, heads)
    assert torch.equal(seen, expected)


def test_rounded_budgets_keep_the_total_and_the_order():
    share = torch.tensor([[50.0, 10.0, 30.0, 10.0], [1.0, 1.0, 1.0, 97.0]])
    counts = round_per_layer(share, total=32, low=4, high=20)
    assert counts.sum(-1).tolist() == [32, 32]
    assert int(counts.min()) >= 4 and int(counts.max()) <= 20
    assert counts[0, 0] >= counts[0, 2] >= counts[0, 1]  # a larger share never gets fewer
    assert counts[1].tolist() == [4, 4, 4, 20]


def test_static_budgets_keep_each_layers_total(subject):
    model, _, _, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    pooled = oracle_visibility(future, policy, "pooled")
    table = static_budgets(kept_per_head(pooled, policy) / 3, policy)
    heads = model.config.kv_heads
    assert table.shape == (3, model.config.n_layer, heads)
    assert (table[0] == 4).all() and (table[1] == 8).all()  # within the budget: all kept
    assert (table[2].sum(-1) == heads * 8).all()  # the first eviction: the layer's total
    assert (table[2] >= 4).all() and (table[2] <= 12).all()  # recent line .. all cached


def test_calibration_in_batches_equals_one_pass(subject):
    model, labels, tokens, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    pooled = oracle_visibility(future, policy, "pooled")
    one_pass = static_budgets(kept_per_head(pooled, policy) / 3, policy)
    seen = []
    batched = calibrate_head_budgets(model, tokens, labels, policy, batch_size=2,
                                     on_batch=seen.append)
    assert seen == [2, 1]
    assert torch.equal(batched, one_pass)
    # Every table it makes is one the policy accepts.
    Policy(PolicyConfig("linear", budget=8, recent_lines=1, head_budgets=batched), model.layout)


@pytest.mark.parametrize("lookahead", [0, 2])
def test_line_scores_are_the_runtimes_scores_before_its_first_eviction(subject,
                                                                       lookahead) -> None:
    """Teacher-forced in one pass, they equal what the cached steps add up for the line whose
    end evicts first (nothing is evicted before it, so both see the whole cache)."""
    model, labels, tokens, _ = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1, lookahead=lookahead),
                    model.layout)
    seen = {}
    plain_select = policy.select

    def select(positions, scores, finished_line, cfg):
        if scores is not None:  # lines that end without an eviction are not scored
            seen.setdefault(finished_line, (positions.clone(), scores.clone()))
        return plain_select(positions, scores, finished_line=finished_line, cfg=cfg)

    policy.select = select
    generate(TorchEngine(model), labels, policy, SamplingConfig(cfg_scale=1.0),
             teacher_tokens=tokens.view(3, 4, 4))
    positions, runtime = seen[2]  # 12 image tokens cached > budget 8: the first eviction
    assert torch.equal(positions[0, 0, 0], torch.arange(positions.shape[-1]))
    emulated = line_scores(model, tokens, labels, policy)[:, :, :, 2, :positions.shape[-1]]
    torch.testing.assert_close(emulated, runtime, atol=1e-4, rtol=1e-4)
    assert runtime.sum() > 0
