"""Tiny exported artifacts, built once per test session and shared by the ONNX test modules."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from linear_export.export.artifact import build_artifact
from linear_export.models import GPT

from conftest import tiny_model

SIDE = 6  # a 6x6 token grid: 36 image tokens, several line-end evictions
_ROOT = Path(tempfile.mkdtemp(prefix="linear-export-tests."))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def model_for(name: str = "GPT-tiny", dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT:
    return tiny_model(name, SIDE, SIDE, seed=seed).to(dtype).requires_grad_(False)


def built(name: str = "GPT-tiny", dtype: torch.dtype = torch.float32,
          capacity: int | None = None, split_cache: bool = False, head_shared: bool = False,
          attention: str = "gqa") -> Path:
    """An artifact of a tiny model (std 0.2 weights, seed 0); read-only for tests: copy it first.

    The fused attention kernel needs split_cache (export.onnx_step.decode_kernel)."""
    capacity = capacity or model_for(name).layout.length
    return _built(name, dtype, capacity, split_cache, head_shared, attention)


@functools.cache  # keyed on the normalised arguments, however the caller spelled them
def _built(name: str, dtype: torch.dtype, capacity: int, split_cache: bool,
           head_shared: bool, attention: str) -> Path:
    model = model_for(name, dtype)
    out = _ROOT / (f"{name}-{str(dtype)[6:]}-{capacity}-{int(split_cache)}"
                   f"-{int(head_shared)}-{attention}")
    build_artifact(model, out, model_name=name, image_size=SIDE * model.config.downsample,
                   weights={"source": "random", "seed": 0, "std": 0.2}, capacity=capacity,
                   build_options={"policy": "full", "budget": None}, max_batch=8,
                   split_cache=split_cache, head_shared=head_shared, attention=attention)
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
