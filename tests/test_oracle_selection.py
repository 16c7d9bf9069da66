"""scripts/oracle_selection.py: its masked forward pass against the runtime, and its budgets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_oracle import oracle_subject

from linear_export.engines.torch import TorchEngine
from linear_export.evaluation.oracle import masked_nll, oracle_visibility
from linear_export.evaluation.sweep import EvalSettings, teacher_forced_nll
from linear_export.runtime.policies import Policy, PolicyConfig

SCRIPT = Path(__file__).parents[1] / "scripts" / "oracle_selection.py"


@pytest.fixture(scope="module")
def oracle():
    spec = importlib.util.spec_from_file_location("oracle_selection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def subject():
    return oracle_subject()  # the same tiny model and images as test_oracle.py


def test_masked_forward_matches_the_runtime(oracle, subject):
    """The pooled oracle's NLL is trusted because the same masked pass, with the uniform
    oracle's masks, reproduces the runtime's cache and evictions."""
    model, labels, tokens, future = subject
    policy = Policy(PolicyConfig("linear", budget=8, recent_lines=1), model.layout)
    engine = TorchEngine(model)
    runtime = teacher_forced_nll(engine, tokens, labels,
                                 oracle.OraclePolicy(policy.config, model.layout, future, 0),
                                 EvalSettings(batch_size=3), None)
    visible = oracle_visibility(future, policy, "uniform")
    masked = masked_nll(model, tokens, labels, visible)
    torch.testing.assert_close(masked, runtime.double(), rtol=1e-4, atol=1e-5)
    full = teacher_forced_nll(engine, tokens, labels, Policy(PolicyConfig("full"), model.layout),
                              EvalSettings(batch_size=3), None)
    assert not torch.allclose(runtime, full), "the budget must evict something to test"
