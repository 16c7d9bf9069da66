"""A Policy from text: keyword options (the CLI's flags) or one spec string (bench's --policies).

    make_policy(layout, "linear", "1/4", lookahead=0)
    parse_policy("linear:1/4:lookahead=0", layout)      # the same policy

A spec is `NAME[:BUDGET][:KNOB=VALUE...]`: NAME one of POLICIES, BUDGET anything
budget.parse_budget reads (default 1/4), each KNOB a PolicyConfig field (`-` may stand for
`_`) or `head_budgets=FILE` (linear: the head-shared pool with that file's table). `full`
keeps the whole cache and takes neither budget nor knobs.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..errors import UserError
from ..models.configs import GPTConfig, SequenceLayout
from .budget import parse_budget
from .head_budgets import load_head_budgets
from .policies import POLICIES, Policy, PolicyConfig

# Tensors that come from a head budgets file, never from text.
TABLES = ("head_budgets", "position_prior", "prior_weight")
KNOBS = {field.name: field for field in fields(PolicyConfig)
         if field.name not in ("name", "budget", *TABLES)}
SPEC_KEYS = (*KNOBS, "head_budgets")
SPEC_HELP = (f"NAME, NAME:BUDGET or NAME:BUDGET:KNOB=VALUE with NAME one of {', '.join(POLICIES)}"
             ", e.g. linear:1/4 or linear:1/6:lookahead=3")


def make_policy(
    layout: SequenceLayout,
    name: str = "linear",
    budget: str | int | None = "1/4",
    *,
    model_config: GPTConfig | None = None,
    head_budgets: str | Path | None = None,
    **knobs: object,
) -> Policy:
    """The validated policy `name` with `budget` (see budget.parse_budget; None: the whole
    image) and PolicyConfig `knobs`; `full` ignores the budget.

    `head_budgets`, a file from `linear-export calibrate` (linear only), gives each kv head its
    own count (the head-shared pool); its table is checked against `model_config`, which it
    therefore needs.
    """
    if name not in POLICIES:
        raise UserError(f"Unknown policy {name!r}; choose one of: {', '.join(POLICIES)}.")
    unknown = [key for key in knobs if key not in KNOBS]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a policy knob; give one of {', '.join(KNOBS)}.")
    tokens = None if name == "full" or budget is None else parse_budget(budget, layout)
    chosen = Policy(PolicyConfig(name=name, budget=tokens, **knobs), layout)
    if head_budgets is None:
        return chosen
    if name != "linear":
        raise UserError(f"--head-budgets sets LineAR's per-head budgets; drop it for --policy "
                        f"{name}.")
    budgets = load_head_budgets(head_budgets)
    if model_config is None and chosen.evicts:
        raise TypeError("make_policy(head_budgets=...) needs model_config: the table is checked "
                        "against the model's layers and kv heads")
    return budgets.apply(chosen, model_config, head_budgets)


def parse_policy(spec: str, layout: SequenceLayout, *,
                 model_config: GPTConfig | None = None) -> Policy:
    """'full', 'linear:1/4', 'streaming:96', 'linear:1/4:lookahead=0' -> make_policy's Policy.

    `head_budgets=FILE` is applied only with `model_config`; without one the file is read and
    checked but the policy comes back without its table, so a spec is checked before any
    model loads and resolved where one has. Any error is one UserError naming the spec.
    """
    name, budget, knobs = _split(spec)
    try:
        head_budgets = knobs.pop("head_budgets", None)
        if head_budgets is not None and model_config is None:
            load_head_budgets(head_budgets)  # says if it is missing or not such a file
            head_budgets = None
        return make_policy(layout, name, budget or "1/4", model_config=model_config,
                           head_budgets=head_budgets, **knobs)
    except UserError as error:  # say which spec: the budget's own message names --budget
        raise UserError(f"In policy spec {spec!r}: {error}") from None


def _split(spec: str) -> tuple[str, str | None, dict[str, object]]:
    """A spec's name, budget (None: the default) and typed knobs, or a UserError."""
    name, *parts = str(spec).split(":")
    name = name.strip()
    if name not in POLICIES:
        raise UserError(f"Unknown policy {spec!r}; use {SPEC_HELP}.")
    if any(not part.strip() for part in parts):
        raise UserError(f"Policy spec {spec!r} has an empty part between colons; use "
                        f"{SPEC_HELP}.")
    budget = parts.pop(0).strip() if parts and "=" not in parts[0] else None
    if name == "full" and (budget is not None or parts):
        raise UserError(f"Policy {spec!r}: full keeps the whole cache and takes no budget "
                        "or knobs.")
    knobs: dict[str, object] = {}
    for part in parts:
        try:
            key, value = parse_knob(part)
        except UserError as error:
            raise UserError(f"In policy spec {spec!r}: {error}") from None
        if key in knobs:
            raise UserError(f"Policy spec {spec!r} sets {key} twice; give each knob once.")
        knobs[key] = value
    if "head_budgets" in knobs and name != "linear":
        raise UserError(f"Policy spec {spec!r}: head_budgets sets LineAR's per-head budgets; "
                        "only linear takes it.")
    return name, budget, knobs


def parse_knob(text: str) -> tuple[str, object]:
    """'lookahead=0' -> ('lookahead', 0), typed like the PolicyConfig field's default."""
    key, _, value = text.strip().partition("=")
    key, value = key.strip().replace("-", "_"), value.strip()
    if key not in SPEC_KEYS or not value:
        raise UserError(f"{text!r} is not a policy knob; give name=value with name one of "
                        f"{', '.join(SPEC_KEYS)}.")
    if key == "head_budgets":  # a file
        return key, value
    default = KNOBS[key].default
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise UserError(f"Knob {key} takes true or false, not {value!r}.")
        return key, value.lower() in ("true", "1")
    if isinstance(default, str):
        return key, value
    try:
        return key, int(value)
    except ValueError:
        raise UserError(f"Knob {key} takes a whole number, not {value!r}.") from None
