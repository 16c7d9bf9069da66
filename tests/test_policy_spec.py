"""runtime/policy_spec.py: one spec string and the keyword form make the same Policy; a bad
spec is one UserError that says what is wrong and how to write it."""

from __future__ import annotations

import pytest
import torch

from linear_export.errors import UserError
from linear_export.models import get_config
from linear_export.models.configs import SequenceLayout
from linear_export.runtime.head_budgets import HeadBudgets
from linear_export.runtime.policies import PolicyConfig
from linear_export.runtime.policy_spec import KNOBS, make_policy, parse_policy

LAYOUT = SequenceLayout(prefix=1, height=16, width=16)


def same_policy(left, right) -> None:
    assert left.config == right.config  # the tables are compared apart (compare=False)
    for name in ("name", "budget", "capacity", "recent_lines", "recent_tokens", "lookahead",
                 "evicts", "head_shared"):
        assert getattr(left, name) == getattr(right, name), name
    for table in ("head_budgets", "position_prior", "prior_weight"):
        a, b = getattr(left.config, table), getattr(right.config, table)
        assert (a is None and b is None) or torch.equal(a, b), table


@pytest.mark.parametrize(("spec", "name", "budget", "knobs"), [
    ("full", "full", "1/4", {}),
    ("linear", "linear", "1/4", {}),
    ("linear:1/6", "linear", "1/6", {}),
    ("linear:96", "linear", 96, {}),
    ("linear:4lines:lookahead=0", "linear", "4lines", {"lookahead": 0}),
    ("linear:1/4:recent-lines=2:cfg_share=true:anchor=3", "linear", "1/4",
     {"recent_lines": 2, "cfg_share": True, "anchor": 3}),
    ("linear:granularity=layer:score_queries=4", "linear", "1/4",
     {"granularity": "layer", "score_queries": 4}),
    ("window:1/4", "window", "1/4", {}),
    ("streaming:96:sinks=2", "streaming", "96", {"sinks": 2}),
    ("h2o:1/2:recent_tokens=16", "h2o", "1/2", {"recent_tokens": 16}),
    (" linear : 1/4 : lookahead = 1 ", "linear", "1/4", {"lookahead": 1}),
])
def test_a_spec_string_is_the_keyword_form(spec, name, budget, knobs) -> None:
    parsed = parse_policy(spec, LAYOUT)
    same_policy(parsed, make_policy(LAYOUT, name, budget, **knobs))


def test_defaults_are_linear_at_a_quarter() -> None:
    policy = make_policy(LAYOUT)
    assert (policy.name, policy.budget) == ("linear", 64)
    assert policy.config.lookahead == PolicyConfig.lookahead
    assert make_policy(LAYOUT, "linear", None).budget == LAYOUT.image_tokens  # no eviction
    assert make_policy(LAYOUT, "full", "not read").budget == LAYOUT.image_tokens


def test_spec_knobs_are_the_policy_config_fields_but_its_tables() -> None:
    assert set(KNOBS) == {"recent_lines", "anchor", "granularity", "cfg_share",
                          "score_queries", "lookahead", "sinks", "recent_tokens"}


@pytest.fixture
def head_budgets_file(tmp_path):
    config = get_config("GPT-tiny-gqa")
    table = torch.tensor([[[4, 4], [4, 4]], [[8, 8], [8, 8]], [[11, 5], [6, 10]]])
    path = tmp_path / "hb.safetensors"
    HeadBudgets({8: table}, (4, 4), config.n_layer, config.kv_heads,
                {8: {"recent_lines": 1, "anchor": 0}}).save(path)
    return config, SequenceLayout(prefix=1, height=4, width=4), table, path


def test_a_head_budgets_file_in_a_spec_is_the_keyword_form(head_budgets_file) -> None:
    config, layout, table, path = head_budgets_file
    spec = f"linear:2lines:head_budgets={path}"
    assert not parse_policy(spec, layout).head_shared  # checked, resolved with a model config
    pooled = parse_policy(spec, layout, model_config=config)
    assert pooled.head_shared and torch.equal(pooled.config.head_budgets, table)
    same_policy(pooled, make_policy(layout, "linear", "2lines", model_config=config,
                                    head_budgets=path))
    with pytest.raises(UserError, match="no table for a budget of 12"):
        parse_policy(f"linear:3lines:head_budgets={path}", layout, model_config=config)
    with pytest.raises(UserError, match="only linear takes it"):
        parse_policy(f"h2o:2lines:head_budgets={path}", layout)
    with pytest.raises(UserError, match="does not exist"):
        parse_policy(f"linear:2lines:head_budgets={path.parent / 'none'}", layout)
    with pytest.raises(UserError, match="drop it for --policy window"):
        make_policy(layout, "window", "2lines", model_config=config, head_budgets=path)
    with pytest.raises(TypeError, match="needs model_config"):
        make_policy(layout, "linear", "2lines", head_budgets=path)


def test_spec_knobs_after_the_budget() -> None:
    plain = parse_policy("linear:1/4", LAYOUT)
    in_place = parse_policy("linear:1/4:lookahead=0:recent-lines=2:cfg_share=true", LAYOUT)
    assert plain.config.lookahead == PolicyConfig.lookahead and plain.budget == 64
    assert (in_place.config.lookahead, in_place.recent_lines) == (0, 2)
    assert in_place.config.cfg_share is True and in_place.budget == 64
    assert parse_policy("linear:granularity=layer", LAYOUT).budget == 64  # the 1/4 default


@pytest.mark.parametrize(("spec", "phrases"), [
    ("lineaar:1/4", ["Unknown policy 'lineaar:1/4'", "e.g. linear:1/4"]),
    ("", ["Unknown policy ''", "NAME one of full, linear"]),
    ("Linear", ["Unknown policy 'Linear'"]),
    ("linear:", ["'linear:' has an empty part between colons"]),
    ("linear::lookahead=1", ["empty part"]),
    ("linear:7/4", ["In policy spec 'linear:7/4'", "--budget '7/4' is not understood"]),
    ("linear:1/4:1/6", ["'1/6' is not a policy knob", "In policy spec 'linear:1/4:1/6'"]),
    ("linear:1/4:lookahaed=0", ["'lookahaed=0' is not a policy knob", "lookahead"]),
    ("linear:1/4:lookahead=", ["'lookahead=' is not a policy knob; give name=value"]),
    ("linear:1/4:position_prior=1", ["'position_prior=1' is not a policy knob"]),
    ("linear:1/4:budget=3", ["'budget=3' is not a policy knob"]),
    ("linear:1/4:lookahead=x", ["Knob lookahead takes a whole number, not 'x'"]),
    ("linear:1/4:cfg_share=maybe", ["Knob cfg_share takes true or false, not 'maybe'"]),
    ("linear:1/4:lookahead=9", ["--lookahead 9 is out of range", "give 0 to 8"]),
    ("linear:1/4:lookahead=1:lookahead=2", ["sets lookahead twice; give each knob once"]),
    ("linear:1/4:granularity=row", ["Unknown granularity 'row'"]),
    ("linear:7", ["--budget 7 tokens is smaller than the 1 recent line"]),
    ("full:1/4", ["full keeps the whole cache and takes no budget or knobs"]),
    ("full:anchor=2", ["full keeps the whole cache"]),
    ("streaming:8:sinks=8", ["give --sinks 0 to 7"]),
])
def test_every_bad_spec_is_one_user_error_saying_what_and_how(spec, phrases) -> None:
    with pytest.raises(UserError) as caught:
        parse_policy(spec, LAYOUT)
    text = str(caught.value)
    assert "\n" not in text and text.endswith((".", ")"))
    for phrase in phrases:
        assert phrase in text


@pytest.mark.parametrize(("call", "phrase"), [
    (lambda: make_policy(LAYOUT, "lru"), "Unknown policy 'lru'; choose one of: full, linear"),
    (lambda: make_policy(LAYOUT, "linear", "1/4", lookahaed=1), "'lookahaed' is not a policy "
                                                                 "knob"),
    (lambda: make_policy(LAYOUT, "linear", "7"), "--budget 7 tokens is smaller"),
    (lambda: make_policy(LAYOUT, "linear", "1/4", anchor=-1), "--anchor -1 is negative"),
])
def test_the_keyword_form_keeps_the_cli_sentences(call, phrase) -> None:
    with pytest.raises(UserError, match=phrase):
        call()
