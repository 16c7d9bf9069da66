"""Engines that run the decode step: torch (reference), ort, tensorrt."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..models.gpt import GPT
from .base import Engine, StepOutput

if TYPE_CHECKING:
    from ..export.artifact import Artifact

ENGINES = ("torch", "ort")

__all__ = ["ENGINES", "Engine", "StepOutput", "make_engine"]


def make_engine(
    name: str,
    model: GPT | None = None,
    *,
    artifact: Artifact | str | Path | None = None,
    device: str = "cpu",
) -> Engine:
    """An engine: torch runs an in-memory PyTorch model, ort an artifact directory."""
    if name == "torch":
        if model is None:
            raise ValueError("the torch engine needs a model")
        from .torch import TorchEngine

        return TorchEngine(model)
    if name == "ort":
        if artifact is None:
            raise UserError("The ort engine runs a built artifact; pass --artifact DIR (from "
                            "linear-export build) or --checkpoint/--random-weights to build one.")
        from .ort import OrtEngine  # onnxruntime loads only when asked for

        return OrtEngine(artifact, device=device)
    raise UserError(f"Unknown engine '{name}'; choose one of: {', '.join(ENGINES)}.")
