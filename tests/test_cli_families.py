"""`generate --family`: the other families from the CLI, and their bad input (exit 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from linear_export.cli import main

T2I = ["generate", "--family", "llamagen-t2i", "--model", "GPT-tiny", "--image-size", "16",
       "--random-weights", "--budget", "2lines", "--top-k", "0"]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from family_fixtures import tiny_janus

    directory = tmp_path_factory.mktemp("janus")
    tiny_janus().save_pretrained(directory)
    return directory


def test_t2i_generates_token_grids_from_caption_features(tmp_path) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(7, 2048)).astype("f4"))
    result = run(*T2I, "--caption-features", str(tmp_path / "a.npy"),
                 "--save-tokens", str(tmp_path / "t.npy"))
    assert result.exit_code == 0, result.output
    tokens = np.load(tmp_path / "t.npy")
    assert tokens.shape == (1, 4, 4) and tokens.max() < 64


def test_t2i_artifact_builds_verifies_and_generates_the_torch_tokens(tmp_path) -> None:
    artifact = tmp_path / "t2i"
    built = run("build", "--family", "llamagen-t2i", "--model", "GPT-tiny", "--image-size", "16",
                "--random-weights", "--budget", "2lines", "--out", str(artifact))
    assert built.exit_code == 0, built.output
    verified = run("verify", str(artifact))
    assert verified.exit_code == 0 and "PASS" in verified.output, verified.output
    np.save(tmp_path / "a.npy", np.random.default_rng(1).normal(size=(9, 2048)).astype("f4"))
    common = ["--caption-features", str(tmp_path / "a.npy"), "--cfg-scale", "4",
              "--temperature", "0"]
    torch_run = run(*T2I, *common, "--save-tokens", str(tmp_path / "torch.npy"))
    ort_run = run("generate", "--family", "llamagen-t2i", "--engine", "ort", "--artifact",
                  str(artifact), "--budget", "2lines", *common,
                  "--save-tokens", str(tmp_path / "ort.npy"))
    assert torch_run.exit_code == 0 and ort_run.exit_code == 0, ort_run.output
    assert np.array_equal(np.load(tmp_path / "torch.npy"), np.load(tmp_path / "ort.npy"))


def test_t2i_out_decodes_with_the_llamagen_vq(tmp_path) -> None:
    from linear_export.models.vq import VQ_CONFIGS, VQModel

    torch.manual_seed(0)
    torch.save({"model": VQModel(VQ_CONFIGS["VQ-tiny"]).state_dict()}, tmp_path / "vq.pt")
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(7, 2048)).astype("f4"))
    out = tmp_path / "samples"
    result = run(*T2I, "--caption-features", str(tmp_path / "a.npy"), "--vq-checkpoint",
                 str(tmp_path / "vq.pt"), "--vq-model", "VQ-tiny", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == [
        "0000_seed0.png", "grid.png", "stats.json", "tokens.npy"]


def test_vq_checkpoint_with_a_family_that_has_its_own_decoder_is_exit_2(janus_dir) -> None:
    result = run("generate", "--family", "janus", "--checkpoint", str(janus_dir),
                 "--prompt", "a cat", "--vq-checkpoint", str(janus_dir / "config.json"))
    assert result.exit_code == 2
    assert "drop --vq-checkpoint" in result.output


def test_t2i_without_caption_features_is_exit_2() -> None:
    result = run(*T2I)
    assert result.exit_code == 2
    assert "needs T5 caption features" in result.output


def test_t2i_caption_longer_than_the_prefix_is_exit_2(tmp_path) -> None:
    np.save(tmp_path / "long.npy", np.zeros((121, 2048), dtype="f4"))
    result = run(*T2I, "--caption-features", str(tmp_path / "long.npy"))
    assert result.exit_code == 2
    assert "prefix capacity of 120 tokens" in result.output


@pytest.mark.parametrize("family", ["lumina", "llamagen"])
def test_checkpoint_of_another_family_is_exit_2(janus_dir, family) -> None:
    result = run("generate", "--family", family, "--checkpoint", str(janus_dir),
                 "--image-size", "32", "--prompt", "a cat")
    assert result.exit_code == 2, result.output
    assert "is a janus model, not " + family in result.output
    assert "--family janus" in result.output
