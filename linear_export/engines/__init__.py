"""Engines that run the decode step: torch (reference), ort, tensorrt."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..models.gpt import GPT
from .base import Engine, StepOutput

if TYPE_CHECKING:
    from ..export.artifact import Artifact

ENGINES = ("torch", "ort", "tensorrt")

__all__ = ["ENGINES", "Engine", "StepOutput", "make_engine"]


def make_engine(
    name: str,
    model: GPT | None = None,
    *,
    artifact: Artifact | str | Path | None = None,
    device: str = "cpu",
    cuda_graph: bool = False,
    threads: int | None = None,
    compile: bool = False,
) -> Engine:
    """An engine: torch runs an in-memory PyTorch model, ort and tensorrt an artifact directory.

    `cuda_graph` (torch only): replay decode steps from a CUDA graph. `compile` (torch only):
    run decode steps under torch.compile. `threads` (ort): intra-op threads [default: all
    cores].
    """
    for flag, given in (("--cuda-graph", cuda_graph), ("--compile", compile)):
        if given and name != "torch":
            raise UserError(f"{flag} applies to the torch engine, not {name}; drop it or use "
                            "--engine torch.")
    if name == "torch":
        if model is None:
            raise ValueError("the torch engine needs a model")
        from .torch import TorchEngine

        return TorchEngine(model, cuda_graph=cuda_graph, compile=compile)
    if name == "tensorrt" and artifact is None:
        raise UserError("The tensorrt engine runs a built artifact's plans; pass --artifact DIR "
                        "from linear-export build --tensorrt.")
    if name == "ort" and artifact is None:
        raise UserError("The ort engine runs a built artifact; pass --artifact DIR (from "
                        "linear-export build) or --checkpoint/--random-weights to build one.")
    if name == "ort":
        from .ort import OrtEngine  # onnxruntime loads only when asked for

        return OrtEngine(artifact, device=device, threads=threads)
    if name == "tensorrt":
        from ..export.tensorrt import require_tensorrt

        require_tensorrt()  # says what is missing before anything is loaded
        from .tensorrt import TrtEngine

        # TensorRT runs on CUDA only: the CLI's default --device cpu means the current GPU.
        return TrtEngine(artifact, device="cuda" if device == "cpu" else device)
    raise UserError(f"Unknown engine '{name}'; choose one of: {', '.join(ENGINES)}.")
