"""Shared fixtures: small random-weight models built once per session."""

from __future__ import annotations

import pytest
import torch

from linear_export.models import GPT, SequenceLayout, get_config, init_weights


def tiny_model(name: str = "GPT-tiny", height: int = 4, width: int = 4, seed: int = 0) -> GPT:
    """A tiny GPT with weights large enough (std 0.2) that attention is far from uniform."""
    layout = SequenceLayout(prefix=1, height=height, width=width)
    return init_weights(GPT(get_config(name), layout), seed=seed, std=0.2).eval()


@pytest.fixture(scope="session")
def tiny() -> GPT:
    return tiny_model()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
