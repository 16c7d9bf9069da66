"""Which kernels a decode step's ONNX export emits: standard ops, or ONNX Runtime's fused ones.

"math": standard ONNX ops only (what TensorRT parses). "gqa": ONNX Runtime's com.microsoft
ops where one replaces a chain of small ones: GroupQueryAttention (reads the bound cache and
writes the step's keys and values into it in place), RotaryEmbedding (RoPE on q and k) and
SkipSimplifiedLayerNormalization (a residual add and the next RMSNorm). A small op costs a few
microseconds to dispatch whatever its size, and a GPT-B step at 16 rows is ~660 of them with
standard ops, ~390 with these (after ORT's optimizer; docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

KERNELS = ("gqa", "math")
_EXPORT_KERNEL: ContextVar[str] = ContextVar("export_kernel", default="math")


@contextmanager
def exporting_kernels(kernel: str) -> Iterator[None]:
    """Within, the model's modules traced by torch.onnx.export emit `kernel`'s ops."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel set {kernel!r}; one of {KERNELS}")
    token = _EXPORT_KERNEL.set(kernel)
    try:
        yield
    finally:
        _EXPORT_KERNEL.reset(token)


def emits_ort_kernels() -> bool:
    """True while an ONNX export that asked for ONNX Runtime's fused ops is tracing."""
    return torch.onnx.is_in_onnx_export() and _EXPORT_KERNEL.get() == "gqa"
