"""evaluation/position_prior.py: the prior of where later lines read, and its per-head weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_oracle import oracle_subject

from linear_export.evaluation.oracle import calibrate_head_budgets
from linear_export.evaluation.position_prior import WEIGHTS, calibrate_position_prior
from linear_export.runtime.policies import Policy, PolicyConfig


@pytest.fixture(scope="module")
def calibrated():
    model, labels, tokens, future = oracle_subject()
    plain = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    table = calibrate_head_budgets(model, tokens, labels, plain, batch_size=2)
    pooled = Policy(replace(plain.config, head_budgets=table), model.layout)
    return model, future, pooled, calibrate_position_prior(model, tokens, labels, pooled,
                                                           batch_size=2)


def test_the_prior_is_the_mean_attention_of_later_lines(calibrated) -> None:
    model, future, policy, found = calibrated
    layout = model.layout
    image = slice(layout.prefix, layout.prefix + layout.image_tokens)
    for finished in range(layout.height - 1):
        later = sum(future[:, :, :, line, image] for line in range(finished + 1, layout.height))
        expected = later.mean(1) / later.mean(1).sum(-1, keepdim=True)
        torch.testing.assert_close(found.prior[finished], expected)


def test_weights_come_from_the_grid_and_never_raise_the_emulated_nll(calibrated) -> None:
    model, _, policy, found = calibrated
    assert found.weight.shape == (model.config.n_layer, model.config.kv_heads)
    assert set(found.weight.flatten().tolist()) <= {0.0, *WEIGHTS}
    assert found.nll_after <= found.nll_before
    Policy(replace(policy.config, position_prior=found.prior, prior_weight=found.weight),
           model.layout)  # the policy takes what calibration made


def test_a_candidate_weight_is_kept_only_where_the_emulated_nll_drops(monkeypatch) -> None:
    """The proxy proposes a weight for heads (0, 0) and (1, 1); only (1, 1) lowers the NLL."""
    import linear_export.evaluation.position_prior as module

    model, labels, tokens, _ = oracle_subject()
    heads = (model.config.n_layer, model.config.kv_heads)
    table = torch.full((3, *heads), 8)
    table[0] = 4
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1, head_budgets=table),
                    model.layout)

    def caught(weighted, batches):  # the proxy likes 1.0 on (0, 0) and 4.0 on (1, 1)
        weight = float(weighted.config.prior_weight[0, 0])
        prize = torch.zeros(heads)
        prize[0, 0], prize[1, 1] = float(weight == 1.0), float(weight == 4.0)
        return prize

    def emulated_nll(model, weighted, batches):
        return 1.0 - 0.1 * float(weighted.config.prior_weight[1, 1] > 0) + 0.1 * float(
            weighted.config.prior_weight[0, 0] > 0)

    monkeypatch.setattr(module, "_caught", caught)
    monkeypatch.setattr(module, "_emulated_nll", emulated_nll)
    found = calibrate_position_prior(model, tokens, labels, Policy(policy.config, model.layout))
    expected = torch.zeros(heads)
    expected[1, 1] = 4.0
    assert torch.equal(found.weight, expected)
    assert (found.nll_before, found.nll_after) == (1.0, 0.9)
