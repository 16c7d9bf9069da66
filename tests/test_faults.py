"""Faults: killed builds and writes, parallel cached builds, a full disk, NaN/Inf logits.

Each test is one row of docs/faults.md. Everything runs on tiny models (GPT-tiny, 4 x 4 or
6 x 6 grids) so the battery takes well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from artifact_fixtures import built, one_torch_thread  # noqa: F401
from click.testing import CliRunner

from linear_export import outputs as outputs_module
from linear_export.cli import main
from linear_export.engines.ort import CACHE_DIR, OrtEngine
from linear_export.engines.torch import TorchEngine
from linear_export.errors import UserError
from linear_export.export import artifact as artifact_module
from linear_export.export.artifact import load_artifact, rehash
from linear_export.runtime.generate import generate
from linear_export.runtime.policies import Policy, PolicyConfig
from linear_export.runtime.sampling import SamplingConfig

from conftest import tiny_model

TINY = ["--model", "GPT-tiny", "--image-size", "16", "--random-weights"]
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "OMP_NUM_THREADS": "1"}


def run(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def leftovers(directory: Path) -> list[str]:
    """Hidden staging or retired directories and temporary files left beside outputs."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(".") and not p.name.endswith(".lock"))


def one_error_line(result, *, progress: bool = False) -> str:
    """Exit 2 and one sentence; `progress`: the command's stage lines may come before it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and (progress or len(lines) == 1), result.output
    return lines[-1]


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "linear_export", *args], env=env or ENV,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- a build killed part-way ---------------------------------------------------------------

@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_build_leaves_nothing_at_its_destination_and_a_rerun_succeeds(tmp_path, kill):
    out = tmp_path / "artifact"
    process = cli("build", *TINY, "--policy", "full", "--out", str(out))
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".artifact.") for p in tmp_path.iterdir()):
        assert process.poll() is None, process.communicate()  # staged before it could finish
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(kill)
    process.communicate(timeout=60)
    assert process.returncode in (-kill, 128 + kill)
    assert not out.exists()
    if kill == signal.SIGTERM:  # exits through Python: the staging directory is removed too
        assert leftovers(tmp_path) == []
    result = run("build", *TINY, "--policy", "full", "--out", out)
    assert result.exit_code == 0, result.output
    assert load_artifact(out).capacity == 17


# -- generate --out killed part-way ------------------------------------------------------------

def test_generate_out_interrupted_while_writing_leaves_no_half_written_outputs(tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "samples"
    real = Path.write_bytes
    written = []

    def interrupted(self, data):
        if written:  # the second file: as if the process were interrupted mid-way
            raise KeyboardInterrupt
        written.append(self)
        return real(self, data)

    args = ["generate", *TINY, "--classes", "1,2", "--budget", "2lines", "--out", out]
    monkeypatch.setattr(Path, "write_bytes", interrupted)
    assert run(*args).exit_code == 1  # click: KeyboardInterrupt -> "Aborted!", exit 1
    assert written[0].parent.name.startswith(".samples.")  # it was writing the staging copy
    assert not out.exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert run(*args).exit_code == 0  # the rerun succeeds
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written.clear()
    monkeypatch.setattr(Path, "write_bytes", interrupted)
    assert run(*args, "--force", "--seed", "5").exit_code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old one, intact
    assert leftovers(tmp_path) == []


# -- eval and calibrate killed part-way ---------------------------------------------------------

@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_eval_leaves_nothing_at_its_destination_and_a_rerun_succeeds(tmp_path, kill):
    """Killed mid-sweep (before it writes anything): no output directory; the rerun works."""
    out = tmp_path / "eval"
    # A sweep of a few minutes, killed 3 s in (the demo model loaded, the sweep under way).
    process = cli("eval", "--policies", "full,linear", "--budgets", "1/2,1/4",
                  "--samples-per-class", "5", "--heldout", "50", "--real", "40",
                  "--out", str(out))
    time.sleep(3)
    assert process.poll() is None, process.communicate()
    process.send_signal(kill)
    process.communicate(timeout=60)
    assert process.returncode in (-kill, 128 + kill)
    assert not out.exists() and leftovers(tmp_path) == []
    assert run("eval", "--quick", "--out", out).exit_code == 0
    assert (out / "eval.json").is_file()


def test_calibrate_interrupted_while_writing_leaves_no_half_written_file(tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "hb.safetensors"
    args = ["calibrate", "--model", "GPT-tiny-gqa", "--image-size", "16", "--random-weights",
            "--budgets", "2lines", "--images", "3", "--batch-size", "2", "--cfg-scale", "1",
            "--out", out]
    real = os.replace

    def interrupted(source, target):  # the rename into place never happens
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    assert run(*args).exit_code == 1  # click: KeyboardInterrupt -> "Aborted!", exit 1
    assert not out.exists() and leftovers(tmp_path) == []  # the temporary file is gone too
    monkeypatch.setattr(os, "replace", real)
    assert run(*args).exit_code == 0 and out.is_file()


# -- a full disk ---------------------------------------------------------------------------------

def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_tokens_or_out_is_one_sentence_and_nothing_half_written(
        tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, handle, mode):
            self.file = real_fdopen(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])  # half of it made it to disk
            full_disk()

    monkeypatch.setattr(outputs_module.os, "fdopen", FullFile)
    tokens = tmp_path / "tokens.npy"
    message = one_error_line(run("generate", *TINY, "--classes", "1", "--budget", "2lines",
                                 "--save-tokens", tokens))
    assert f"Cannot write '{tokens}' (No space left on device)" in message
    assert "free some disk space" in message
    assert list(tmp_path.iterdir()) == []  # no tokens.npy, no temporary file
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out = tmp_path / "samples"
    message = one_error_line(run("generate", *TINY, "--classes", "1", "--budget", "2lines",
                                 "--out", out))
    assert f"Cannot write '{out}'" in message and list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_build_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    def export_until_full(model, path, **kwargs):
        path.write_bytes(b"half a graph")
        full_disk()

    monkeypatch.setattr(artifact_module, "export_step", export_until_full)
    out = tmp_path / "artifact"
    message = one_error_line(run("build", *TINY, "--policy", "full", "--out", out),
                             progress=True)
    assert "No space left on device" in message and list(tmp_path.iterdir()) == []


# -- two builds of the same cached artifact at once ------------------------------------------

def test_two_generates_building_the_same_cached_artifact_both_succeed_with_one_artifact(
        tmp_path):
    cache = tmp_path / "cache"
    runs = [cli("generate", *TINY, "--engine", "ort", "--classes", "3", "--budget", "2lines",
                "--save-tokens", str(tmp_path / f"{name}.npy"),
                env={**ENV, "LINEAR_EXPORT_CACHE": str(cache)}) for name in "ab"]
    results = [process.communicate(timeout=300) for process in runs]
    assert [process.returncode for process in runs] == [0, 0], results
    artifacts = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(artifacts) == 1 and leftovers(cache) == []
    load_artifact(artifacts[0])
    builders = [err for _, err in results if "Building an ort artifact" in err]
    assert len(builders) == 1  # the other waited for it and reused it
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


# -- NaN/Inf in the logits -----------------------------------------------------------------------

class NanAfter:
    """The torch engine, with every logit NaN from step `start` on (as an fp16 overflow);
    with `one`, only the last row's last logit takes `value`."""

    def __init__(self, engine, start: int, value: float = float("nan"), one: bool = False):
        self.engine, self.start, self.calls = engine, start, 0
        self.value, self.one = value, one

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, *args, **kwargs):
        out = self.engine.step(*args, **kwargs)
        self.calls += 1
        if self.calls > self.start:
            logits = out.logits.clone()
            if self.one:
                logits[-1, -1] = self.value
            else:
                logits.fill_(self.value)
            out = dataclasses.replace(out, logits=logits)
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_on_the_torch_engine_are_caught_at_the_first_token(value):
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].attention.wqkv.weight[0, 0] = value  # deep inside, not the head
    policy = Policy(PolicyConfig("linear", budget=8), model.layout)
    with pytest.raises(UserError, match="NaN/Inf logits at image token 0 "):
        generate(TorchEngine(model), [1, 2], policy, SamplingConfig())


def test_nan_logits_mid_image_are_caught_within_the_line_they_appear_in():
    model = tiny_model()
    engine = NanAfter(TorchEngine(model), start=7)  # image tokens 0..6 fine, NaN from 7 on
    policy = Policy(PolicyConfig("linear", budget=8), model.layout)
    with pytest.raises(UserError) as error:
        generate(engine, [1], policy, SamplingConfig())
    # On the CPU every step is checked; on accelerators the first step of each line (the
    # NaN is in the cache by then), so the error comes within the line it appeared in.
    assert "NaN/Inf logits at image token 7 " in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_single_non_finite_logit_among_finite_ones_is_caught(value):
    engine = NanAfter(TorchEngine(tiny_model()), start=3, value=value, one=True)
    policy = Policy(PolicyConfig("full"), engine.layout)
    with pytest.raises(UserError, match="NaN/Inf logits at image token 3 "):
        generate(engine, [1, 2], policy, SamplingConfig())


@pytest.mark.usefixtures("one_torch_thread")
def test_nan_weights_in_an_ort_artifact_are_one_sentence_exit_2(tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(built("GPT-tiny"), copy, ignore=shutil.ignore_patterns(CACHE_DIR))
    graph = onnx.load(str(copy / "step.onnx"), load_external_data=False).graph
    entries = [{e.key: e.value for e in t.external_data} for t in graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    data = np.fromfile(copy / "step.onnx.data", dtype=np.uint8)
    for entry in entries:  # every external weight NaN
        offset, length = int(entry.get("offset", 0)), int(entry["length"])
        data[offset:offset + length].view(np.float32)[:] = np.nan
    data.tofile(copy / "step.onnx.data")
    rehash(copy)
    engine = OrtEngine(copy, threads=1)
    with pytest.raises(UserError, match="NaN/Inf logits at image token 0 "):
        generate(engine, [1], Policy(PolicyConfig("full"), engine.layout), SamplingConfig())
    message = one_error_line(run("generate", "--engine", "ort", "--artifact", copy,
                                 "--classes", "1", "--policy", "full"))
    assert "NaN/Inf logits" in message
