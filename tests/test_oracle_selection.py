"""scripts/oracle_selection.py: its masked forward pass against the runtime, and its budgets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from linear_export.engines.torch import TorchEngine
from linear_export.evaluation.sweep import EvalSettings, teacher_forced_nll
from linear_export.runtime.policies import Policy, PolicyConfig

from conftest import tiny_model

SCRIPT = Path(__file__).parents[1] / "scripts" / "oracle_selection.py"


@pytest.fixture(scope="module")
def oracle():
    spec = importlib.util.spec_from_file_location("oracle_selection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def subject(oracle):
    """A tiny model on a 4 x 4 grid, three teacher-forced images and their future attention."""
    model = tiny_model(height=4, width=4)
    labels = [1, 3, 5]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (3, 16), generator=generator)
    return model, labels, tokens, oracle.future_attention(model, tokens, labels)


def test_masked_forward_matches_the_runtime(oracle, subject):
    """The pooled oracle's NLL is trusted because the same masked pass, with the uniform
    oracle's masks, reproduces the runtime's cache and evictions."""
    model, labels, tokens, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    engine = TorchEngine(model)
    runtime = teacher_forced_nll(engine, tokens, labels,
                                 oracle.OraclePolicy(policy.config, model.layout, future, 0),
                                 EvalSettings(batch_size=3), None)
    visible = oracle.oracle_visibility(future, policy, "uniform")
    masked = oracle.masked_nll(model, tokens, labels, visible)
    torch.testing.assert_close(masked, runtime.double(), rtol=1e-4, atol=1e-5)
    full = teacher_forced_nll(engine, tokens, labels, Policy(PolicyConfig("full"), model.layout),
                              EvalSettings(batch_size=3), None)
    assert not torch.allclose(runtime, full), "the budget must evict something to test"


def test_fixed_budgets_equal_to_the_budget_are_the_uniform_oracle(oracle, subject):
    model, labels, tokens, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    table = torch.full((3, model.config.n_layer, model.config.kv_heads), 8)
    uniform = oracle.oracle_visibility(future, policy, "uniform")
    assert torch.equal(oracle.oracle_visibility(future, policy, table), uniform)


def test_fixed_budgets_give_each_head_its_count(oracle, subject):
    model, labels, tokens, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    layers, heads = model.config.n_layer, model.config.kv_heads
    table = torch.full((3, layers, heads), 8)
    table[2, :, 0], table[2, :, 1] = 11, 5  # after line 2: 12 image tokens cached
    visible = oracle.oracle_visibility(future, policy, table)
    first_query_of_line_3 = 1 + 3 * 4
    seen = visible[..., first_query_of_line_3, 1:first_query_of_line_3].sum(-1)  # [L, B, H]
    expected = table[2][:, None, :].expand(layers, 3, heads)
    assert torch.equal(seen, expected)


def test_rounded_budgets_keep_the_total_and_the_order(oracle):
    share = torch.tensor([[50.0, 10.0, 30.0, 10.0], [1.0, 1.0, 1.0, 97.0]])
    counts = oracle._round_per_layer(share, total=32, low=4, high=20)
    assert counts.sum(-1).tolist() == [32, 32]
    assert int(counts.min()) >= 4 and int(counts.max()) <= 20
    assert counts[0, 0] >= counts[0, 2] >= counts[0, 1]  # a larger share never gets fewer
    assert counts[1].tolist() == [4, 4, 4, 20]


def test_static_budgets_keep_each_layers_total(oracle, subject):
    model, _, _, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    pooled = oracle.oracle_visibility(future, policy, "pooled")
    table = oracle.static_budgets(pooled, policy)
    heads = model.config.kv_heads
    assert table.shape == (3, model.config.n_layer, heads)
    assert (table[0] == 4).all() and (table[1] == 8).all()  # within the budget: all kept
    assert (table[2].sum(-1) == heads * 8).all()  # the first eviction: the layer's total
    assert (table[2] >= 4).all() and (table[2] <= 12).all()  # recent line .. all cached
