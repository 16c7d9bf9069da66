"""Every budget and policy spec string parses to a policy the design allows, or is one UserError.

Property-based (hypothesis) over runtime/budget.py parse_budget, runtime/policy_spec.py
parse_policy and cli/options.py build_policy: never another exception, and a parsed policy's
capacity is prefix + budget + one line, never above the full sequence.
"""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linear_export.cli import main
from linear_export.errors import UserError
from linear_export.models.configs import SequenceLayout
from linear_export.runtime.budget import parse_budget
from linear_export.runtime.policies import POLICIES, Policy
from linear_export.runtime.policy_spec import KNOBS, parse_policy
from linear_export.runtime.policy_spec import make_policy as build_policy

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
layouts = st.builds(SequenceLayout, prefix=st.integers(1, 3), height=st.integers(1, 8),
                    width=st.integers(1, 8))
numbers = st.one_of(st.integers(-3, 70), st.integers(-10**30, 10**30)).map(str)
budget_texts = st.one_of(
    st.text(max_size=12),
    numbers,
    st.builds("{}/{}".format, st.integers(-2, 20), st.integers(-2, 20)),
    st.builds("{}{}lines".format, st.integers(-2, 12), st.sampled_from(["", " "])),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["1/4", "0.25", ".5", "1.", "1e-1", "1e-99999999", " 2 / 8 ", "3 line",
                     "nan", "inf", "1/0", "0lines", "١٢", "-1/4"]),
)
knob_values = st.one_of(numbers, st.sampled_from(["true", "false", "head", "layer", "row", ""]),
                        st.text(max_size=4))
knob_names = st.sampled_from([*KNOBS, "nope", "recent-lines", "budget", "name"])
specs = st.one_of(
    st.text(max_size=30),
    st.builds(lambda name, budget, knobs: ":".join(
        [name, *([budget] if budget is not None else []),
         *(f"{key}={value}" for key, value in knobs)]),
        st.sampled_from([*POLICIES, "lru", "", "Linear"]), st.none() | budget_texts,
        st.lists(st.tuples(knob_names, knob_values), max_size=3)),
)


def assert_follows_design(policy: Policy, layout: SequenceLayout) -> None:
    """DESIGN.md: C = P + budget + W with eviction, the full P + N without, never above it."""
    config = policy.config
    assert 1 <= policy.budget <= layout.image_tokens
    if policy.evicts:
        assert policy.capacity == min(layout.prefix + policy.budget + layout.width,
                                      layout.length)
    else:
        assert policy.capacity == layout.length
    assert layout.prefix < policy.capacity <= layout.length
    if policy.name == "linear":  # the budget holds what is never evicted
        assert config.anchor + policy.recent_lines * layout.width <= policy.budget
    if policy.name == "window":
        assert policy.budget % layout.width == 0
    if policy.name == "streaming":
        assert 0 <= config.sinks < policy.budget
    if policy.name == "h2o":
        assert 0 <= policy.recent_tokens <= policy.budget
    for knob in ("anchor", "sinks", "score_queries", "recent_lines"):
        value = getattr(config, knob)
        assert value is None or value >= 0
    assert 0 <= policy.config.score_queries <= layout.width


def one_sentence(error: UserError) -> None:
    text = str(error)
    assert text and "\n" not in text and text.rstrip().endswith((".", ")"))


@FAST
@given(text=budget_texts, layout=layouts)
def test_every_budget_string_is_tokens_within_the_image_or_one_user_error(text, layout) -> None:
    started = time.perf_counter()
    try:
        tokens = parse_budget(text, layout)
    except UserError as error:
        one_sentence(error)
        assert "--budget" in str(error)
    else:
        assert isinstance(tokens, int) and 1 <= tokens <= layout.image_tokens
    assert time.perf_counter() - started < 1  # no string makes the parser work for minutes


@FAST
@given(spec=specs, layout=layouts)
def test_every_policy_spec_parses_to_a_design_capacity_or_one_user_error(spec, layout) -> None:
    try:
        policy = parse_policy(spec, layout)
    except UserError as error:
        one_sentence(error)
    else:
        assert_follows_design(policy, layout)


@FAST
@given(layout=layouts, policy=st.sampled_from([*POLICIES, "lru"]), budget=budget_texts,
       knobs=st.fixed_dictionaries({}, optional={
           name: st.integers(-3, 40) for name in ("recent_lines", "anchor", "score_queries",
                                                  "lookahead", "sinks", "recent_tokens")}))
def test_the_cli_policy_options_build_a_design_policy_or_one_user_error(layout, policy, budget,
                                                                         knobs) -> None:
    try:
        chosen = build_policy(layout, policy, budget, **knobs)
    except UserError as error:
        one_sentence(error)
    else:
        assert_follows_design(chosen, layout)


DEMO_LINE = 16  # the bundled demo model: 64 px, a 16 x 16 grid


@pytest.mark.parametrize(("args", "phrase"), [
    (["--budget", "7"], "--budget 7 tokens is smaller than the 1 recent line (16 tokens) plus 0 "
                        "anchor tokens that --policy linear always keeps; give --budget 16 to "
                        "256 tokens"),
    (["--budget", "1lines", "--anchor", "3"], "give --budget 19 to 256 tokens"),
    (["--budget", "1lines", "--recent-lines", "17"], "more than the whole image (256 tokens)"),
    (["--budget", "1/4", "--score-queries", "17"], "give 0 (all of them) to 16"),
    (["--budget", "1/4", "--lookahead", "9"], "give 0 to 8 lines"),
    (["--budget", "1e-99999999"], "--budget '1e-99999999' is not understood"),
    (["--policy", "window", "--budget", "7"], "give --budget 16 to 256 tokens"),
    (["--policy", "streaming", "--budget", "8", "--sinks", "8"], "give --sinks 0 to 7"),
    (["--policy", "h2o", "--budget", "8", "--recent-tokens", "9"], "give 0 to 8"),
    (["--budget", "1/4", "--sinks", "-1"], "--sinks -1 is negative; give 0 or more"),
])
def test_demo_generate_refuses_budgets_that_cannot_hold_what_is_kept(args, phrase) -> None:
    """The issue's case: --budget 7 ran and silently kept 7 + 16 tokens; now exit 2 before
    any weights load, one sentence naming the option, the value and the valid range."""
    result = CliRunner().invoke(main, ["generate", *args, "--no-decode"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert phrase in result.output


def test_a_sub_line_budget_is_fine_when_no_recent_line_is_asked_for() -> None:
    layout = SequenceLayout(prefix=1, height=16, width=DEMO_LINE)
    policy = build_policy(layout, "linear", "7", recent_lines=0)
    assert policy.budget == 7 and policy.capacity == 1 + 7 + DEMO_LINE


@pytest.mark.parametrize("args", [["--cfg-scale", "nan"], ["--temperature", "inf"]])
def test_sampling_knobs_must_be_finite(args) -> None:
    result = CliRunner().invoke(main, ["generate", "--budget", "1/4", *args, "--no-decode"])
    assert result.exit_code == 2 and "must be finite numbers" in result.output
