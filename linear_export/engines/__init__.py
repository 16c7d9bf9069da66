"""Engines that run the decode step: torch (reference), ort, tensorrt."""

from __future__ import annotations

from ..errors import UserError
from ..models.gpt import GPT
from .base import Engine, StepOutput

ENGINES = ("torch",)

__all__ = ["ENGINES", "Engine", "StepOutput", "make_engine"]


def make_engine(name: str, model: GPT) -> Engine:
    """An engine for an in-memory PyTorch model."""
    if name == "torch":
        from .torch import TorchEngine

        return TorchEngine(model)
    raise UserError(f"Unknown engine '{name}'; choose one of: {', '.join(ENGINES)}.")
