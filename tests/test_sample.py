"""`linear-export sample`: in-process and Ray runs agree byte for byte, survive a killed worker
and a killed driver, and refuse bad input with one sentence (bundled demo model, 64 px)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from linear_export.api.sample import SampleSpec
from linear_export.api.sample_run import FAULT_ENV, RAY_MISSING, sample
from linear_export.api.shards import DONE, NPZ
from linear_export.cli import main
from linear_export.errors import UserError

TOTAL, SHARD = 40, 8
SPEC = SampleSpec(num_samples=TOTAL)  # the demo: 10 classes round-robin, CFG 1


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def indices_on_disk(out: Path) -> list[int]:
    return sorted(int(png.stem) for png in (out / "shards").glob("shard-*/*.png"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "reference"
    summary = sample(SPEC, out, shard_size=SHARD, progress=False)
    assert summary.samples == TOTAL and summary.shards == TOTAL // SHARD
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_in_process_layout(reference):
    arrays = np.load(reference / NPZ)
    assert list(arrays.keys()) == ["arr_0"]
    images = arrays["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (TOTAL, 64, 64, 3)
    assert indices_on_disk(reference) == list(range(TOTAL))
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["npz"]["sha256"] == digest(reference / NPZ)
    assert manifest["counts"]["per_class"] == {str(c): 4 for c in range(10)}
    assert manifest["stats"]["kv_bytes"] > 0 and manifest["stats"]["images_per_s"] > 0


def test_two_ray_workers_equal_in_process(ray_cluster, reference, tmp_path):
    summary = sample(SPEC, tmp_path / "ray", workers=2, shard_size=SHARD, progress=False)
    assert summary.npz_sha256 == digest(reference / NPZ)
    assert (tmp_path / "ray" / NPZ).read_bytes() == (reference / NPZ).read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "ray" / NPZ)["arr_0"],
                                  np.load(reference / NPZ)["arr_0"])


def test_killed_worker_is_retried(ray_cluster, reference, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")  # the actor running shard 2 exits, once
    out = tmp_path / "faulty"
    summary = sample(SPEC, out, workers=2, shard_size=SHARD, progress=False)
    assert marker.exists()  # a worker really died mid-run
    assert indices_on_disk(out) == list(range(TOTAL))  # every index exactly once
    dones = [json.loads(p.read_text()) for p in sorted(out.glob(f"shards/*/{DONE}"))]
    assert [(d["start"], d["stop"]) for d in dones] == [(s, s + SHARD)
                                                        for s in range(0, TOTAL, SHARD)]
    assert summary.npz_sha256 == digest(reference / NPZ)


def test_killed_driver_resumes(reference, tmp_path):
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "linear_export", "sample", "--num-samples", str(TOTAL),
         "--shard-size", str(SHARD), "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list(out.glob(f"shards/*/{DONE}"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()
    finished = sorted(out.glob(f"shards/*/{DONE}"))
    assert 2 <= len(finished) < TOTAL // SHARD and not (out / NPZ).exists()
    # One finished shard loses a PNG: its count no longer matches, so it is redone.
    broken, kept = finished[-1].parent, finished[:-1]
    next(broken.glob("*.png")).unlink()
    times = {p: p.stat().st_mtime_ns for p in kept}

    summary = sample(SPEC, out, shard_size=SHARD, progress=False)
    assert summary.reused_shards == len(kept)
    assert {p: p.stat().st_mtime_ns for p in kept} == times  # reused, not rewritten
    assert indices_on_disk(out) == list(range(TOTAL))
    assert (out / NPZ).read_bytes() == (reference / NPZ).read_bytes()


def test_missing_ray_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match="Ray is not installed"):
        sample(SPEC, tmp_path / "x", workers=1, progress=False)
    result = CliRunner().invoke(main, ["sample", "--workers", "2", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and RAY_MISSING in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples 0 must be at least 1"),
    (["--shard-size", "0"], "--shard-size 0 must be at least 1"),
    (["--classes", "3,12"], "Class id 12 is out of range"),
    (["--family", "janus"], "llamagen (class-conditional) only"),
    (["--num-gpus-per-worker", "1"], "need Ray workers"),
    (["--classes", "3,x"], "is not a comma-separated list of class ids"),
    (["--artifact", "some-dir"], "--artifact runs on the ort or tensorrt engine"),
    (["--artifact", "some-dir", "--engine", "ort", "--random-weights"],
     "--artifact already holds the weights"),
])
def test_bad_options(tmp_path, args, message):
    result = CliRunner().invoke(main, ["sample", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_existing_out_of_another_run(reference, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    result = CliRunner().invoke(main, ["sample", "--num-samples", "8", "--out", str(reference)])
    assert result.exit_code == 2 and "num_samples differ" in result.output
    assert "--force" in result.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["sample", "--out", str(other)])
    assert result.exit_code == 2 and "holds no sample run" in result.output
    assert (other / "notes.txt").read_text() == "mine"
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


def test_rerun_of_a_finished_run_reuses_everything(reference):
    result = CliRunner().invoke(main, ["sample", "--num-samples", str(TOTAL), "--shard-size",
                                       str(SHARD), "--out", str(reference)])
    assert result.exit_code == 0, result.output
    assert f"all {TOTAL // SHARD} shards were complete" in result.output


def test_help():
    result = CliRunner().invoke(main, ["sample", "--help"])
    assert result.exit_code == 0 and "--num-gpus-per-worker" in result.output
