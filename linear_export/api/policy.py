"""A cache policy bound to an engine: from one spec string or from keyword arguments."""

from __future__ import annotations

from ..engines.base import Engine
from ..errors import UserError
from ..models import get_config
from ..models.configs import SequenceLayout
from ..runtime.policies import Policy, fit_policy
from ..runtime.policy_spec import make_policy as layout_policy
from ..runtime.policy_spec import parse_policy
from .models import ModelSource


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
        if knobs or budget is not None:
            raise UserError(f"Policy {spec!r} already gives its budget and knobs; pass either a "
                            "spec string or a name with keywords, not both.")
        chosen = parse_policy(spec, layout, model_config=config)
    else:
        chosen = layout_policy(layout, spec, budget or "1/4", model_config=config, **knobs)
    return chosen if isinstance(engine, ModelSource) else fit_engine(chosen, engine)


def fit_engine(policy: Policy, engine: Engine) -> Policy:
    """An artifact's graph has a static cache size: the policy runs within it (or fails)."""
    artifact = getattr(engine, "artifact", None)
    if artifact is None:  # the torch engine allocates what the policy asks for
        return policy
    if policy.head_shared and not artifact.head_shared:
        raise UserError(f"Artifact '{artifact.path}' was built without --head-budgets, so it "
                        "cannot run them; rebuild it with linear-export build --head-budgets "
                        "FILE, or drop --head-budgets.")
    return fit_policy(policy, artifact.capacity)
