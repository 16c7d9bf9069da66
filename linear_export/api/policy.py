"""A cache policy bound to an engine: from one spec string or from keyword arguments."""

from __future__ import annotations

from ..engines.base import Engine
from ..errors import UserError
from ..models import get_config
from ..models.configs import GPTConfig, SequenceLayout
from ..runtime.budget import parse_budget
from ..runtime.head_budgets import load_head_budgets
from ..runtime.policies import POLICIES, Policy, PolicyConfig
from .models import ModelSource


def policy_from_options(layout: SequenceLayout, policy: str, budget: str,
                        model_config: GPTConfig | None = None, head_budgets: str | None = None,
                        **knobs: object) -> Policy:
    """The policy the options ask for; `head_budgets` (a file) needs `model_config`."""
    if policy not in POLICIES:
        raise UserError(f"Unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}.")
    tokens = None if policy == "full" else parse_budget(budget, layout)
    chosen = Policy(PolicyConfig(name=policy, budget=tokens, **knobs), layout)
    if head_budgets is None:
        return chosen
    if policy != "linear":
        raise UserError(f"--head-budgets sets LineAR's per-head budgets; drop it for --policy "
                        f"{policy}.")
    return load_head_budgets(head_budgets).apply(chosen, model_config, head_budgets)


def make_policy(spec: str, engine: Engine | ModelSource, *, budget: str | None = None,
                **knobs: object) -> Policy:
    """A policy for `engine`'s token layout, fitted to an artifact's static cache capacity.

    A LlamaGen class-to-image ModelSource in place of the engine checks the policy before
    any weights load.

    `spec` is one string, the bench syntax ('full', 'linear:1/4', 'linear:1/4:lookahead=0',
    'h2o:1/8'), or a bare policy name with `budget` and PolicyConfig fields as keywords:
    make_policy("linear", engine, budget="1/4", lookahead=3, head_budgets="budgets.json")."""
    if isinstance(engine, ModelSource):
        config = get_config(engine.model)
        layout = SequenceLayout.for_image(config, engine.image_size)  # c2i: no end-of-line
    else:
        config, layout = engine.config, engine.family.token_layout(engine.layout)
    if ":" in spec or (budget is None and not knobs):
        from ..runtime.bench import parse_policy

        if knobs or budget is not None:
            raise UserError(f"Policy {spec!r} already gives its budget and knobs; pass either a "
                            "spec string or a name with keywords, not both.")
        chosen = parse_policy(spec, layout, config)
    else:
        chosen = policy_from_options(layout, spec, budget or "1/4", model_config=config, **knobs)
    return chosen if isinstance(engine, ModelSource) else fit_engine(chosen, engine)


def fit_engine(policy: Policy, engine: Engine) -> Policy:
    """An artifact's graph has a static cache size: the policy runs within it (or fails)."""
    artifact = getattr(engine, "artifact", None)
    if artifact is None:  # the torch engine allocates what the policy asks for
        return policy
    if policy.head_shared and not artifact.head_shared:
        raise UserError(f"Artifact '{artifact.path}' was built without --head-shared, so it "
                        "cannot run --head-budgets; rebuild it with linear-export build "
                        "--head-shared, or drop --head-budgets.")
    from ..engines.ort import fit_policy

    return fit_policy(policy, artifact.capacity)
