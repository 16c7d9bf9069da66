"""vq_decoder.onnx in the artifact: build records it, verify compares it, generate uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_fixtures import one_torch_thread  # noqa: F401
from click.testing import CliRunner
from PIL import Image

from linear_export.cli import main
from linear_export.demo import DEMO_DIR, DEMO_MODEL_NAME, DEMO_VQ_NAME
from linear_export.export.artifact import load_artifact
from linear_export.models.vq import load_vq
from linear_export.runtime.decode import to_uint8


def run(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vq") / "demo-artifact"
    result = run("build", "--checkpoint", DEMO_DIR / "gpt.safetensors", "--model",
                 DEMO_MODEL_NAME, "--image-size", 64, "--policy", "linear", "--budget", "1/4",
                 "--max-batch", 8, "--vq-checkpoint", DEMO_DIR / "vq.safetensors",
                 "--vq-model", DEMO_VQ_NAME, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_build_records_the_decoder_in_the_manifest(artifact: Path) -> None:
    loaded = load_artifact(artifact)  # hashes include vq_decoder.onnx
    record = loaded.manifest["vq_decoder"]
    assert record["model"] == DEMO_VQ_NAME and (artifact / record["file"]).is_file()
    assert record["file"] in loaded.manifest["files"]


def test_verify_compares_the_decoder(artifact: Path) -> None:
    result = run("verify", artifact, "--policy", "linear", "--batch", 2)
    assert result.exit_code == 0, result.output
    assert "vq decoder ort vs torch" in result.output and ": pass" in result.output


def test_generate_on_ort_writes_images_decoded_by_the_onnx_decoder(artifact: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "samples"
    result = run("generate", "--engine", "ort", "--artifact", artifact, "--classes", "0,1",
                 "--out", out)
    assert result.exit_code == 0, result.output
    tokens = torch.from_numpy(np.load(out / "tokens.npy"))
    vq = load_vq(DEMO_DIR / "vq.safetensors", DEMO_VQ_NAME, encoder=False)
    with torch.no_grad():
        expected = to_uint8(vq.decode_codes(tokens)).astype(int)  # [B, H, W, 3]
    for index, class_id in enumerate((0, 1)):
        picture = np.asarray(Image.open(out / f"{index:04d}_class{class_id}_seed0.png"))
        # ONNX Runtime vs torch rounding: at most one 8-bit level apart
        difference = np.abs(picture.astype(int) - expected[index])
        assert difference.max() <= 1
