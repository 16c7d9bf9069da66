"""`build`, `verify` and `generate --engine ort` for Janus and Lumina artifacts (--family)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from family_fixtures import save_word_tokenizer, tiny_chameleon, tiny_janus  # noqa: E402

from linear_export.cli import main  # noqa: E402

PROMPT = ["--prompt", "w3 w7 w9 w2", "--prompt", "w5 w1"]  # two lengths: two prefix groups


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny random Janus and Lumina directories with a word tokenizer each."""
    root = tmp_path_factory.mktemp("families")
    janus, lumina = root / "janus", root / "lumina"
    tiny_janus().save_pretrained(janus)
    # A vocabulary wide enough for Lumina-mGPT's own special-token ids (8197, 8803, 8804+).
    tiny_chameleon(vocab_size=8900).save_pretrained(lumina)
    for directory in (janus, lumina):
        save_word_tokenizer(directory)
    return {"janus": janus, "lumina": lumina}


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
    """A random Chameleon VQGAN (16 codes, as tiny_chameleon) in Meta's vqgan.ckpt layout."""
    from chameleon_vq_fixtures import meta_vqgan_state, save_meta_ckpt

    path = tmp_path_factory.mktemp("vqgan") / "vqgan.ckpt"
    save_meta_ckpt(path, meta_vqgan_state(seed=2))
    return path


@pytest.fixture(scope="module")
def artifacts(model_dirs, vqgan, tmp_path_factory):
    built = {}
    for family, directory in model_dirs.items():
        out = tmp_path_factory.mktemp("artifacts") / family
        decoder = ["--vq-checkpoint", vqgan] if family == "lumina" else []
        result = run("build", "--family", family, "--checkpoint", directory, "--image-size",
                     64, "--max-prompt-tokens", 24, "--policy", "linear", "--budget", "2lines",
                     "--max-batch", 8, *decoder, "--out", out)
        assert result.exit_code == 0, result.output
        built[family] = out
    return built


@pytest.mark.parametrize("family", ["janus", "lumina"])
def test_manifest_records_the_family_and_its_adapter(artifacts, model_dirs, family) -> None:
    manifest = json.loads((artifacts[family] / "manifest.json").read_text())
    assert manifest["model"]["family"] == family
    assert manifest["model"]["adapter"]["name"] == family
    assert manifest["weights"]["source"] == "hf"
    assert manifest["weights"]["path"] == str(model_dirs[family].resolve())
    # Lumina lines are 4 codes + an end-of-line token; the cache is sized on those lines:
    # prefix + 2 kept lines + the line in flight.
    width = 4 + (family == "lumina")
    assert manifest["capacity"] == 24 + 3 * width


@pytest.mark.parametrize("family", ["janus", "lumina"])
def test_verify_passes_against_the_transformers_reference(artifacts, family) -> None:
    result = run("verify", artifacts[family], "--batch", 2)
    assert result.exit_code == 0, result.output
    assert f"({family} " in result.output
    assert "PASS" in result.output
    assert "FAIL" not in result.output
    if family == "lumina":  # its artifact holds the Chameleon VQGAN graph too
        assert "vq decoder ort vs torch" in result.output


@pytest.mark.parametrize("family", ["janus", "lumina"])
def test_ort_artifact_generates_the_torch_engine_tokens(artifacts, model_dirs, family,
                                                        tmp_path) -> None:
    common = ["generate", "--family", family, "--policy", "linear", "--budget", "2lines",
              "--cfg-scale", 2.0, "--temperature", 0, "--seed", 3, *PROMPT]
    torch_run = run(*common, "--checkpoint", model_dirs[family], "--image-size", 64,
                    "--max-prompt-tokens", 24, "--save-tokens", tmp_path / "torch.npy")
    assert torch_run.exit_code == 0, torch_run.output
    ort_run = run(*common, "--engine", "ort", "--artifact", artifacts[family],
                  "--save-tokens", tmp_path / "ort.npy")
    assert ort_run.exit_code == 0, ort_run.output
    expected, got = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "ort.npy")
    assert got.shape == (2, 4, 4)
    np.testing.assert_array_equal(got, expected)


def test_janus_out_writes_decoded_images(artifacts, tmp_path) -> None:
    out = tmp_path / "samples"
    result = run("generate", "--family", "janus", "--engine", "ort", "--artifact",
                 artifacts["janus"], *PROMPT, "--out", out)
    assert result.exit_code == 0, result.output
    assert "images and token grids" in result.output
    names = sorted(path.name for path in out.iterdir())
    assert names == ["0000_seed0.png", "0001_seed0.png", "grid.png", "stats.json", "tokens.npy"]


def test_lumina_out_decodes_with_the_artifacts_vqgan_graph(artifacts, vqgan, tmp_path) -> None:
    manifest = json.loads((artifacts["lumina"] / "manifest.json").read_text())
    assert manifest["vq_decoder"]["model"] == "chameleon-vqgan"
    assert manifest["vq_decoder"]["path"] == str(vqgan.resolve())
    out = tmp_path / "samples"
    result = run("generate", "--family", "lumina", "--engine", "ort", "--artifact",
                 artifacts["lumina"], *PROMPT, "--out", out)
    assert result.exit_code == 0, result.output
    assert "images and token grids" in result.output
    names = sorted(path.name for path in out.iterdir())
    assert names == ["0000_seed0.png", "0001_seed0.png", "grid.png", "stats.json", "tokens.npy"]


def test_artifact_of_another_family_is_exit_2(artifacts) -> None:
    result = run("generate", "--family", "lumina", "--engine", "ort", "--artifact",
                 artifacts["janus"], *PROMPT)
    assert result.exit_code == 2
    assert "holds a janus model" in result.output
    result = run("generate", "--engine", "ort", "--artifact", artifacts["janus"])
    assert result.exit_code == 2
    assert "pass --family janus" in result.output


@pytest.mark.parametrize("args, message", [
    (["--family", "llamagen-t2i"], "a LlamaGen t2i GPT"),
    (["--family", "janus"], "needs --checkpoint DIR"),
])
def test_unbuildable_family_options_are_exit_2(tmp_path, args, message) -> None:
    out = tmp_path / "artifact"
    result = run("build", *args, "--out", out)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_lumina_ids_outside_the_vocabulary_are_exit_2(tmp_path) -> None:
    directory = tmp_path / "small-vocab"
    tiny_chameleon().save_pretrained(directory)  # 96 tokens: no room for Lumina's ids
    result = run("build", "--family", "lumina", "--checkpoint", directory, "--image-size", 64,
                 "--out", tmp_path / "artifact")
    assert result.exit_code == 2
    assert "outside this model's vocabulary" in result.output


def test_bench_runs_a_family_on_torch_and_ort(model_dirs, tmp_path) -> None:
    out = tmp_path / "bench"
    result = run("bench", "--family", "lumina", "--checkpoint", model_dirs["lumina"],
                 "--image-size", 64, "--max-prompt-tokens", 24, "--engines", "torch,ort",
                 "--policies", "full,linear:2lines", "--batch-sizes", 1, "--repeats", 1,
                 "--warmup-steps", 1, "--threads", 1, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["family"] == "lumina"
    runs = {(r["engine"], r["policy"]): r for r in report["results"]}
    # No LlamaGen baseline loop for other families; both engines ran both policies.
    assert set(runs) == {(e, p) for e in ("torch", "ort") for p in ("full", "linear:2lines")}
    for engine in ("torch", "ort"):
        full, linear = runs[engine, "full"], runs[engine, "linear:2lines"]
        # Lumina lines are 5 tokens: prefix 24 + 3 lines in flight vs 24 + all 4 lines.
        assert (full["kv_capacity"], linear["kv_capacity"]) == (24 + 4 * 5, 24 + 3 * 5)
        assert linear["kv_bytes"] < full["kv_bytes"]


def test_eval_sweeps_a_family_against_its_full_cache(model_dirs, tmp_path) -> None:
    out = tmp_path / "eval"
    result = run("eval", "--family", "lumina", "--checkpoint", model_dirs["lumina"],
                 "--image-size", 64, "--max-prompt-tokens", 24, *PROMPT, "--policies",
                 "full,linear,window", "--budgets", "1/1,2lines", "--samples-per-class", 2,
                 "--cfg-scale", 2.0, "--out", out)
    assert result.exit_code == 0, result.output
    rows = {(row["policy"], row["budget"]): row
            for row in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows["full", "all"]["agreement"] == 1.0
    # A whole-image budget (w + 1 token lines) evicts nothing: same tokens, same likelihood.
    assert rows["linear", "1/1"]["agreement"] == 1.0
    assert abs(rows["linear", "1/1"]["nll_delta"]) < 1e-6
    for name in ("linear", "window"):
        row = rows[name, "2lines"]
        assert np.isfinite(row["nll_delta"]) and row["capacity"] == 24 + 3 * 5
        assert row["accuracy"] is None and row["frechet"] is None  # no judge for families
    assert (out / "eval.md").is_file() and (out / "metrics.png").is_file()
