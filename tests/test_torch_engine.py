"""TorchEngine (engines/torch.py): the compiled decode step gives the eager step's results."""

from __future__ import annotations

import pytest
import torch
from artifact_fixtures import model_for

from linear_export.engines import make_engine
from linear_export.errors import UserError
from linear_export.runtime.generate import generate
from linear_export.runtime.policy_spec import parse_policy
from linear_export.runtime.sampling import SamplingConfig


def test_compiled_decode_steps_match_the_eager_engine() -> None:
    """A whole LineAR generation, greedy: the same tokens, and close logits at the end."""
    model = model_for()
    eager, compiled = make_engine("torch", model), make_engine("torch", model, compile=True)
    assert eager._compiled is None and compiled._compiled is not None
    policy = parse_policy("linear:1/2", model.family.token_layout(model.layout),
                          model_config=model.config)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=1)
    want = generate(eager, [1, 2], policy, sampling, seed=0)
    got = generate(compiled, [1, 2], policy, sampling, seed=0)
    assert torch.equal(got.tokens, want.tokens)


def test_compile_is_the_torch_engines_option_only() -> None:
    with pytest.raises(UserError, match="--compile applies to the torch engine, not ort"):
        make_engine("ort", artifact="unused", compile=True)
