"""The artifact directory: manifest, hash checks, atomic builds, no overwrite without --force."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from artifact_fixtures import built, model_for

from linear_export.errors import UserError
from linear_export.export import artifact as artifact_module
from linear_export.export.artifact import (
    SCHEMA_VERSION,
    build_artifact,
    load_artifact,
    sha256_file,
)
from linear_export.export.consistency import DIGEST, manifest_digest
from linear_export.export.onnx_step import TensorSpec
from linear_export.export.reference import reference_model

TINY = {"name": "GPT-tiny"}


@pytest.fixture
def copy(tmp_path) -> Path:
    """A private copy of the shared tiny artifact, free to damage."""
    target = tmp_path / "artifact"
    shutil.copytree(built(**TINY), target, ignore=shutil.ignore_patterns(".ort"))
    return target


def test_manifest_fields() -> None:
    artifact = load_artifact(built(**TINY))
    manifest = artifact.manifest
    model = model_for()
    assert manifest["schema_version"] == SCHEMA_VERSION == 6
    assert manifest["model"]["name"] == "GPT-tiny"
    assert manifest["model"]["config"] == asdict(model.config)
    assert manifest["layout"] == {"prefix": 1, "height": 6, "width": 6}
    assert manifest["image_size"] == 24 and manifest["vocab_size"] == 64
    assert manifest["num_classes"] == 10 and manifest["capacity"] == 37
    assert manifest["dtype"] == "fp32" and manifest["opset"] == 18
    step_io = manifest["io"]["step.onnx"]
    assert [spec["name"] for spec in step_io["inputs"]] == [
        "input_ids", "position_ids", "past_key", "past_value", "cache_len", "score_position_ids"]
    assert step_io["inputs"][2]["shape"] == [2, "batch", 4, 37, 16]
    assert step_io["inputs"][4] == {"name": "cache_len", "dtype": "int64", "shape": []}
    assert [spec["name"] for spec in manifest["io"]["step_decode.onnx"]["outputs"]] == [
        "logits", "present_key", "present_value", "present_query"]
    assert [spec["name"] for spec in manifest["io"]["score.onnx"]["outputs"]] == ["line_mass"]
    assert set(manifest["files"]) == {"step.onnx", "step.onnx.data", "step_decode.onnx",
                                      "score.onnx"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(artifact.path / name)
        assert entry["bytes"] == (artifact.path / name).stat().st_size
    for tool in ("torch", "onnx", "onnxruntime", "linear_export"):
        assert manifest["tools"][tool]
    assert manifest["build"]["max_batch"] == 8
    assert manifest["build"]["variants"] == ["score.onnx", "step.onnx", "step_decode.onnx"]
    assert manifest["build"]["attention"] == "math"  # stacked cache inputs: no fused kernel
    assert manifest["weights"] == {"source": "random", "seed": 0, "std": 0.2}
    assert (artifact.capacity, artifact.dtype, artifact.layout) == (37, torch.float32,
                                                                    model.layout)


def test_reference_model_is_rebuilt_from_the_manifest() -> None:
    rebuilt = reference_model(load_artifact(built(**TINY)))
    for (name, got), want in zip(rebuilt.state_dict().items(), model_for().state_dict().values(),
                                 strict=True):
        assert torch.equal(got, want), name


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "step.onnx.data").write_bytes(
        (d / "step.onnx.data").read_bytes()[:-4] + b"oops"),
     "step.onnx.data is corrupt (sha256 mismatch); rebuild with linear-export build --force."),
    (lambda d: (d / "step.onnx").unlink(),
     "step.onnx is missing from artifact"),
    (lambda d: (d / "step_decode.onnx").write_bytes(b"short"),
     "step_decode.onnx is corrupt (size 5 bytes"),
    (lambda d: (d / "manifest.json").write_text("{not json"),
     "manifest.json in"),
    (lambda d: (d / "manifest.json").unlink(),
     "is not an artifact (manifest.json is missing)"),
])
def test_damaged_artifacts_name_the_file(copy: Path, damage, message: str) -> None:
    damage(copy)
    with pytest.raises(UserError) as error:
        load_artifact(copy)
    text = str(error.value)
    assert message in text and "\n" not in text


def test_other_schema_versions_and_missing_directories_are_refused(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="schema version 99"):
        load_artifact(copy)
    manifest["schema_version"] = 5  # the same graphs, unless built for per-head budgets
    manifest[DIGEST] = manifest_digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_artifact(copy).capacity == manifest["capacity"]
    manifest["build"]["head_shared"] = True  # its step took slot_owner
    manifest[DIGEST] = manifest_digest(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="schema version 5 with per-head budgets"):
        load_artifact(copy)
    with pytest.raises(UserError, match="does not exist"):
        load_artifact(copy.parent / "nowhere")


def fake_export(path: Path, **_) -> tuple[list, list]:
    """Stands in for the dynamo export: two small files, as the real one writes."""
    path.write_bytes(b"graph")
    path.with_name(path.name + ".data").write_bytes(b"weights")
    return [TensorSpec("input_ids", "int64", ("batch", "steps"))], []


def build_tiny(out: Path, **options):
    model = model_for()
    return build_artifact(model, out, model_name="GPT-tiny", image_size=24,
                          weights={"source": "random", "seed": 0, "std": 0.2},
                          capacity=model.layout.length, build_options={"policy": "full"},
                          **options)


def fake_sharing_export(model, directory: Path, main: Path, *, name: str, **_):
    """Stands in for the decode and score graphs' export (a graph beside main's weights)."""
    (directory / name).write_bytes(b"graph")
    return [], []


def test_no_overwrite_without_force_and_force_replaces(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(artifact_module, "export_step", lambda model, path, **kw:
                        fake_export(path))
    for name in ("export_decode_sharing", "export_score_sharing"):
        monkeypatch.setattr(artifact_module, name, fake_sharing_export)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists; pass --force"):
        build_tiny(out)
    assert (out / "keep.txt").read_text() == "precious"
    build_tiny(out, force=True)
    assert not (out / "keep.txt").exists()
    # The fake graph is no ONNX, so read the manifest directly (load_artifact parses graphs).
    assert json.loads((out / "manifest.json").read_text())["files"]["step.onnx"]["bytes"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


@pytest.mark.parametrize("interrupt", [RuntimeError("exporter crashed"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch, interrupt,
                                                    existing: bool) -> None:
    def export_then_fail(model, path, **kwargs):
        fake_export(path)  # a half-written artifact in the staging directory
        raise interrupt

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old artifact")
    monkeypatch.setattr(artifact_module, "export_step", export_then_fail)
    with pytest.raises(type(interrupt)):
        build_tiny(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:  # --force replaces only once the new artifact is complete
        assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_bf16_and_oversized_capacity_are_refused(tmp_path) -> None:
    model = model_for().to(torch.bfloat16)
    with pytest.raises(UserError, match="fp32 or fp16"):
        build_artifact(model, tmp_path / "x", model_name="GPT-tiny", image_size=24, weights={},
                       capacity=37, build_options={})
    with pytest.raises(UserError, match="exceeds the whole sequence"):
        build_artifact(model_for(), tmp_path / "x", model_name="GPT-tiny", image_size=24,
                       weights={}, capacity=38, build_options={})
    assert not any(tmp_path.iterdir())
