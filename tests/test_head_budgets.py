"""runtime/head_budgets.py: the per-head budgets file, and what it refuses to be applied to."""

from __future__ import annotations

import pytest
import torch

from linear_export.errors import UserError
from linear_export.models import get_config
from linear_export.models.configs import SequenceLayout
from linear_export.runtime.head_budgets import HeadBudgets, load_head_budgets
from linear_export.runtime.policies import Policy, PolicyConfig

CONFIG = get_config("GPT-tiny-gqa")  # 2 layers, 2 kv heads
LAYOUT = SequenceLayout(prefix=1, height=4, width=4)


def budgets() -> HeadBudgets:
    table = torch.tensor([[[4, 4], [4, 4]], [[8, 8], [8, 8]], [[11, 5], [6, 10]]])
    return HeadBudgets({8: table}, (4, 4), CONFIG.n_layer, CONFIG.kv_heads,
                       {8: {"recent_lines": 1, "anchor": 0}}, source="test")


def test_round_trip_and_the_table_for_a_policy(tmp_path) -> None:
    path = tmp_path / "hb.safetensors"
    budgets().save(path)
    loaded = load_head_budgets(path)
    assert loaded.grid == (4, 4) and loaded.source == "test"
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), LAYOUT)
    table = loaded.for_policy(policy, CONFIG, path)
    assert torch.equal(table, budgets().tables[8]) and table.dtype == torch.int64
    Policy(PolicyConfig("linear", budget=8, recent_lines=1, head_budgets=table), LAYOUT)


@pytest.mark.parametrize(("budget", "recent_lines", "layout", "phrase"), [
    (12, 1, LAYOUT, "no table for a budget of 12"),
    (8, 2, LAYOUT, "keep 1 recent lines"),
    (8, 1, SequenceLayout(prefix=1, height=5, width=4), "calibrated for a 4x4 grid"),
])
def test_a_table_for_another_policy_or_model_is_refused(budget, recent_lines, layout,
                                                        phrase) -> None:
    policy = Policy(PolicyConfig("linear", budget=budget, recent_lines=recent_lines), layout)
    with pytest.raises(UserError, match=phrase):
        budgets().for_policy(policy, CONFIG)


def test_missing_and_foreign_files_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_head_budgets(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a head budgets file"):
        load_head_budgets(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(UserError, match="not a head budgets file"):
        load_head_budgets(tmp_path / "weights.safetensors")


def with_prior() -> HeadBudgets:
    found = budgets()
    prior = torch.rand(3, CONFIG.n_layer, CONFIG.kv_heads, 16)
    found.priors = {8: prior / prior.sum(-1, keepdim=True)}
    found.prior_weights = {8: torch.tensor([[0.0, 1.0], [4.0, 0.0]])}
    found.knobs[8]["lookahead"] = 4
    return found


def test_a_position_prior_round_trips_and_applies(tmp_path) -> None:
    path = tmp_path / "hb.safetensors"
    saved = with_prior()
    saved.save(path)
    policy = load_head_budgets(path).apply(
        Policy(PolicyConfig("linear", budget=8, recent_lines=1), LAYOUT), CONFIG, path)
    assert policy.head_shared and policy.lookahead == 4
    assert torch.equal(policy.config.position_prior, saved.priors[8])
    assert torch.equal(policy.config.prior_weight, saved.prior_weights[8])
    without = budgets().apply(Policy(PolicyConfig("linear", budget=8, recent_lines=1), LAYOUT),
                              CONFIG)
    assert without.head_shared and without.config.position_prior is None
    whole = Policy(PolicyConfig("linear", budget=16), LAYOUT)
    assert with_prior().apply(whole, CONFIG) is whole  # nothing to evict, nothing to apply


def test_a_prior_weighed_for_another_lookahead_is_refused() -> None:
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1, lookahead=2), LAYOUT)
    with pytest.raises(UserError, match="pass --lookahead 4"):
        with_prior().apply(policy, CONFIG)
