"""The public API: the names a user imports, a generation through them, and the example that
embeds them (examples/serve.py, run as a process and asked for an image over HTTP)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import linear_export as le
from linear_export.runtime.decode import png_bytes

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_names_are_importable_from_the_package() -> None:
    for name in ("load_model", "open_engine", "make_policy", "generate", "build", "verify",
                 "bench", "evaluate", "calibrate", "load_artifact", "load_decoder",
                 "SamplingConfig", "ModelSource"):
        assert callable(getattr(le, name)), name
    assert set(le.__all__) <= set(dir(le))


def test_demo_generation_through_the_api_streams_lines_and_decodes() -> None:
    model = le.load_model()  # the bundled demo
    engine = le.open_engine(model)
    policy = le.make_policy("linear:1/4", engine)
    assert policy.name == "linear" and policy.capacity < engine.layout.length
    seen = []
    result = le.generate(engine, [0, 1, 2], policy, le.SamplingConfig(cfg_scale=1.0),
                         batch_size=2, seed=3, decoder=le.load_decoder(engine),
                         on_line=lambda done, total: seen.append((done, total)))
    lines = engine.layout.height
    assert seen == [(done, 2 * lines) for done in range(1, 2 * lines + 1)]  # two batches
    assert result.tokens.shape == (3, lines, engine.layout.width)
    assert result.images.shape == (3, 64, 64, 3) and result.images.dtype == np.uint8
    assert result.stats["images"] == 3 and result.stats["kv_capacity"] == policy.capacity
    # The keyword form names the same policy.
    same = le.make_policy("linear", engine, budget="1/4")
    assert (same.budget, same.capacity) == (policy.budget, policy.capacity)
    names = set(result.files())
    assert {"tokens.npy", "stats.json", "grid.png", "0000_class0_seed3.png"} <= names


def test_an_engine_made_without_the_api_generates_too() -> None:
    from linear_export.engines.torch import TorchEngine

    from conftest import tiny_model

    engine = TorchEngine(tiny_model())
    result = le.generate(engine, [1, 2], le.make_policy("full", engine), seed=0)
    assert result.tokens.shape == (2, engine.layout.height, engine.layout.width)
    assert result.stats["family"] == "llamagen" and result.stats["model"] is None
    assert result.stats["image_size"] == engine.layout.height * engine.config.downsample


def test_a_spec_with_keywords_too_is_one_clear_error() -> None:
    engine = le.open_engine(le.load_model())
    with pytest.raises(le.UserError, match="not both"):
        le.make_policy("linear:1/4", engine, lookahead=2)


def test_the_example_service_answers_with_the_image_the_api_makes() -> None:
    # CPU numerics depend on the thread count, and other tests (in-process `sample`) change
    # this process's: both sides sample on one thread.
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serve.py"),
                                "--port", "0"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line
        base = line.split()[2].split("/generate")[0]
        with urllib.request.urlopen(f"{base}/generate?class=4&seed=11", timeout=120) as reply:
            assert reply.headers["Content-Type"] == "image/png"
            served = reply.read()
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(f"{base}/generate?class=99", timeout=60)
        assert bad.value.code == 400
    finally:
        process.terminate()
        process.wait(timeout=30)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = le.open_engine(le.load_model())
        expected = le.generate(engine, [4], le.make_policy("linear:1/4", engine),
                               le.SamplingConfig(cfg_scale=1.0), seed=11,
                               decoder=le.load_decoder(engine))
    finally:
        torch.set_num_threads(threads)
    assert served == png_bytes(expected.images[0])
