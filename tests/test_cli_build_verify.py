"""`linear-export build`, `verify` and `generate --engine ort` end to end on GPT-tiny."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from artifact_fixtures import one_torch_thread  # noqa: F401
from click.testing import CliRunner

from linear_export.cli import main
from linear_export.export.artifact import load_artifact, rehash
from linear_export.models import load_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ["--model", "GPT-tiny", "--image-size", "24", "--random-weights"]


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, [str(arg) for arg in args], env=env)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """One CLI build (LineAR, 2 of 6 lines: capacity 1 + 12 + 6), shared read-only."""
    out = tmp_path_factory.mktemp("cli") / "tiny-linear"
    result = run("build", *TINY, "--policy", "linear", "--budget", "2lines", "--max-batch", "8",
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert "exporting step.onnx" in result.output and "MiB" in result.output
    assert "export" in result.output.splitlines()[-1]
    return out


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(artifact, target, ignore=shutil.ignore_patterns(".ort"))
    return target


def test_build_records_the_policy_capacity(artifact: Path) -> None:
    manifest = load_artifact(artifact).manifest
    assert manifest["capacity"] == 19
    assert manifest["build"]["policy"] == "linear" and manifest["build"]["budget"] == "2lines"
    assert manifest["weights"] == {"source": "random", "seed": 0, "std": 0.02}
    again = run("build", *TINY, "--out", artifact)
    assert again.exit_code == 2 and "already exists; pass --force" in again.output


def test_verify_passes_and_prints_the_table(artifact: Path) -> None:
    result = run("verify", artifact, "--batch", "2")
    assert result.exit_code == 0, result.output
    for text in ("logits", "present_key", "present_value", "attn_mass", "max abs", "atol",
                 "1e-04", "policy linear", "identical (pass)", "PASS"):
        assert text in result.output, text
    assert "full skipped" in result.output  # 19 slots cannot hold the full cache


def test_verify_of_a_tampered_artifact_is_one_sentence_and_exit_2(copy: Path) -> None:
    data = bytearray((copy / "step.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (copy / "step.onnx.data").write_bytes(bytes(data))
    result = run("verify", copy)
    assert result.exit_code == 2
    assert result.output.strip() == ("error: step.onnx.data is corrupt (sha256 mismatch); "
                                     "rebuild with linear-export build --force.")


def test_verify_catches_a_real_mismatch_with_exit_1(copy: Path) -> None:
    # Perturb the largest weight in the external data, then re-hash so loading succeeds.
    graph = onnx.load(str(copy / "step.onnx"), load_external_data=False).graph
    entries = [{e.key: e.value for e in t.external_data} for t in graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    largest = max(entries, key=lambda entry: int(entry["length"]))
    offset, length = int(largest.get("offset", 0)), int(largest["length"])
    data = np.fromfile(copy / "step.onnx.data", dtype=np.uint8)
    weights = data[offset:offset + length].view(np.float32)
    weights += 0.05
    data.tofile(copy / "step.onnx.data")
    rehash(copy)
    result = run("verify", copy, "--policy", "linear")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "logits" in result.output


def test_generate_on_an_artifact(artifact: Path, tmp_path) -> None:
    tokens = tmp_path / "t.npy"
    result = run("generate", "--engine", "ort", "--artifact", artifact, "--classes", "1,2",
                 "--budget", "2lines", "--save-tokens", tokens)
    assert result.exit_code == 0, result.output
    assert np.load(tokens).shape == (2, 6, 6) and "capacity 19 slots" in result.output
    too_big = run("generate", "--engine", "ort", "--artifact", artifact, "--policy", "full",
                  "--classes", "1")
    assert too_big.exit_code == 2
    assert "holds 19 cache slots but --policy full needs 37" in too_big.output
    wrong = run("generate", "--engine", "ort", "--artifact", artifact, "--model", "GPT-B",
                "--classes", "1")
    assert wrong.exit_code == 2 and "contradicts the artifact" in wrong.output
    torch_engine = run("generate", "--artifact", artifact)
    assert torch_engine.exit_code == 2 and "--engine ort" in torch_engine.output


def test_generate_builds_into_the_user_cache_once(tmp_path) -> None:
    env = {"LINEAR_EXPORT_CACHE": str(tmp_path / "cache")}
    args = ["generate", "--engine", "ort", "--model", "GPT-tiny", "--image-size", "16",
            "--random-weights", "--classes", "3", "--budget", "1lines", "--temperature", "0"]
    first = run(*args, "--save-tokens", tmp_path / "a.npy", env=env)
    assert first.exit_code == 0, first.output
    assert "Building an ort artifact" in first.output
    second = run(*args, "--save-tokens", tmp_path / "b.npy", env=env)
    assert second.exit_code == 0 and "Building" not in second.output
    # One artifact (beside it only its hidden lock, see cli/build.py cached_artifact).
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    # The same greedy tokens as the PyTorch engine.
    torch_run = run(*args[:2], "torch", *args[3:], "--save-tokens", tmp_path / "c.npy")
    assert torch_run.exit_code == 0, torch_run.output
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))


def test_build_and_verify_from_a_checkpoint(tmp_path) -> None:
    checkpoint = tmp_path / "tiny.pt"
    torch.save(load_gpt("GPT-tiny", 16, None, seed=3).state_dict(), checkpoint)
    out = tmp_path / "artifact"
    built_ = run("build", "--model", "GPT-tiny", "--image-size", "16", "--checkpoint", checkpoint,
                 "--policy", "full", "--out", out)
    assert built_.exit_code == 0, built_.output
    weights = load_artifact(out).manifest["weights"]
    assert weights["source"] == "checkpoint" and weights["path"] == str(checkpoint.resolve())
    assert run("verify", out, "--batch", "1", "--policy", "full").exit_code == 0
    moved = checkpoint.rename(tmp_path / "moved.pt")
    missing = run("verify", out, "--batch", "1", "--policy", "full")
    assert missing.exit_code == 2 and "pass it with --checkpoint PATH" in missing.output
    assert run("verify", out, "--batch", "1", "--policy", "full",
               "--checkpoint", moved).exit_code == 0
    torch.save(load_gpt("GPT-tiny", 16, None, seed=4).state_dict(), moved)
    other = run("verify", out, "--batch", "1", "--policy", "full", "--checkpoint", moved)
    assert other.exit_code == 2 and "sha256 mismatch" in other.output
