"""Self-consistent artifacts: the manifest against its graphs and digest, and ORT's cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from artifact_fixtures import built, one_torch_thread  # noqa: F401
from click.testing import CliRunner

from linear_export.cli import main
from linear_export.engines.cache import CacheShape, KVCache
from linear_export.engines.ort import CACHE_DIR, OrtEngine
from linear_export.errors import UserError
from linear_export.export.artifact import load_artifact, rehash
from linear_export.export.consistency import DIGEST, STAMP, manifest_digest

TINY = {"name": "GPT-tiny"}  # capacity 37, stacked cache inputs


@pytest.fixture
def copy(tmp_path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(built(**TINY), target, ignore=shutil.ignore_patterns(CACHE_DIR))
    return target


def edit(directory: Path, change, *, keep_digest: bool = False) -> None:
    """Hand-edit the manifest; the digest is recomputed unless `keep_digest` (a careful forger
    gets past the digest, and the field check must still catch the edit)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if not keep_digest:
        manifest[DIGEST] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def one_sentence(directory: Path) -> str:
    with pytest.raises(UserError) as error:
        load_artifact(directory)
    text = str(error.value)
    assert "\n" not in text and text.endswith("rebuild with linear-export build --force.")
    return text


def test_a_fresh_artifact_records_its_digest_and_loads() -> None:
    manifest = load_artifact(built(**TINY)).manifest
    assert manifest[DIGEST] == manifest_digest(manifest)


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: m.update(capacity=40), "says capacity 40, but step.onnx's past_key"),
    (lambda m: m.update(dtype="fp16"), "says dtype fp16"),
    (lambda m: m["model"]["config"].update(n_layer=3), "model.config.n_layer 3"),
    (lambda m: m["model"]["config"].update(vocab_size=65), "model.config.vocab_size 65"),
    (lambda m: m.update(vocab_size=65), "says vocab_size 65"),
    (lambda m: m["build"].update(head_shared=True), "build.head_shared True"),
    (lambda m: m["build"].update(cache_inputs="per-layer"), "build.cache_inputs per-layer"),
    (lambda m: m["build"].update(max_batch="8"), "build.max_batch 8"),
    (lambda m: m["io"]["step.onnx"]["inputs"][2].update(shape=[2, "batch", 4, 40, 8]),
     "io.step.onnx.inputs past_key has shape"),
    (lambda m: m["io"]["step_decode.onnx"]["outputs"].pop(),
     "io.step_decode.onnx.outputs"),
    (lambda m: m["model"].update(config={"dim": 32}), "no valid model.config"),
])
def test_a_field_that_disagrees_with_the_graph_is_named(copy: Path, change, field: str) -> None:
    edit(copy, change)
    assert field in one_sentence(copy)


def test_an_edit_the_graphs_cannot_show_is_caught_by_the_digest(copy: Path) -> None:
    edit(copy, lambda m: m.update(image_size=32), keep_digest=True)
    assert f"does not match its recorded {DIGEST}" in one_sentence(copy)
    edit(copy, lambda m: m.update(capacity=40), keep_digest=True)  # the field is named first
    assert "says capacity 40" in one_sentence(copy)


def test_artifacts_built_before_digests_still_load(copy: Path) -> None:
    edit(copy, lambda m: m.pop(DIGEST), keep_digest=True)
    assert load_artifact(copy).capacity == 37


def test_a_manifest_copied_from_another_build(copy: Path) -> None:
    other = built("GPT-tiny", capacity=19, split_cache=True)
    shutil.copy(other / "manifest.json", copy / "manifest.json")
    assert "is corrupt" in one_sentence(copy)  # its hashes are the other build's
    rehash(copy)  # even with the hashes made to match, the graph tells
    assert "io.step.onnx.inputs" in one_sentence(copy)


def test_verify_on_an_edited_manifest_is_exit_2_not_a_traceback(copy: Path) -> None:
    edit(copy, lambda m: m.update(capacity=40))
    result = CliRunner().invoke(main, ["verify", str(copy), "--policy", "full"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "says capacity 40" in lines[0]


def step_logits(directory: Path) -> torch.Tensor:
    engine = OrtEngine(directory, threads=1)
    config = engine.config
    cache = KVCache(CacheShape(config.n_layer, 1, config.kv_heads, engine.capacity,
                               config.head_dim), engine.dtype, engine.device)
    ids, positions = torch.tensor([[config.vocab_size + 3]]), torch.tensor([[0]])
    return engine.step(ids, positions, cache, need_scores=False).logits.clone()


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("damage", ["altered", "truncated", "unstamped"])
def test_a_damaged_ort_cache_entry_is_rebuilt_not_trusted(copy: Path, damage: str) -> None:
    want = step_logits(copy)
    entries = sorted(path.parent for path in (copy / CACHE_DIR).glob("*/model.onnx"))
    assert entries and all((entry / STAMP).is_file() for entry in entries)
    for entry in entries:
        data = entry / "model.onnx.data"
        payload = bytearray(data.read_bytes())
        if damage == "altered":  # same size, other weights: only the stamp's hash sees it
            payload[len(payload) // 2:] = bytes(len(payload) - len(payload) // 2)
            data.write_bytes(payload)
        elif damage == "truncated":
            data.write_bytes(payload[: len(payload) // 2])
        else:  # an entry from before stamps, or one whose stamp was lost
            (entry / STAMP).unlink()
    torch.testing.assert_close(step_logits(copy), want, rtol=0, atol=0)
    assert all((entry / STAMP).is_file() for entry in entries)  # rebuilt and stamped again
