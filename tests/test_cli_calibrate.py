"""`linear-export calibrate`, and --head-budgets through generate (torch and ort engines)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from linear_export.cli import main
from linear_export.models import get_config
from linear_export.models.configs import SequenceLayout
from linear_export.runtime.head_budgets import load_head_budgets
from linear_export.runtime.policies import Policy, PolicyConfig

TINY = ["--model", "GPT-tiny-gqa", "--image-size", "16", "--random-weights"]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def head_budgets(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrate") / "hb.safetensors"
    result = run("calibrate", *TINY, "--budgets", "2lines,1/1", "--images", "5",
                 "--batch-size", "2", "--cfg-scale", "1", "--out", str(path))
    assert result.exit_code == 0, result.output
    assert "budget 8 tokens per head" in result.output and "no table needed" in result.output
    assert "position prior on" in result.output
    return path


def test_calibrate_writes_a_table_the_policy_accepts(head_budgets) -> None:
    config = get_config("GPT-tiny-gqa")
    budgets = load_head_budgets(head_budgets)
    assert set(budgets.tables) == {8} and budgets.source.startswith("samples, 5 images")
    assert set(budgets.priors) == {8} and budgets.knobs[8]["lookahead"] == 4
    layout = SequenceLayout.for_image(config, 16)
    policy = Policy(PolicyConfig("linear", budget=8), layout)
    table = budgets.for_policy(policy, config)
    assert table.shape == (3, config.n_layer, config.kv_heads)
    assert (table[2].sum(-1) == config.kv_heads * 8).all()
    Policy(PolicyConfig("linear", budget=8, head_budgets=table), layout)


def test_generate_with_head_budgets_on_torch_and_ort(head_budgets, tmp_path,
                                                     monkeypatch) -> None:
    monkeypatch.setenv("LINEAR_EXPORT_CACHE", str(tmp_path / "cache"))
    common = [*TINY, "--classes", "1,2", "--budget", "2lines", "--temperature", "0",
              "--head-budgets", str(head_budgets)]
    torch_run = run("generate", *common, "--save-tokens", str(tmp_path / "torch.npy"))
    ort_run = run("generate", *common, "--engine", "ort", "--save-tokens",
                  str(tmp_path / "ort.npy"))
    assert torch_run.exit_code == 0 and ort_run.exit_code == 0, torch_run.output + ort_run.output
    assert np.array_equal(np.load(tmp_path / "torch.npy"), np.load(tmp_path / "ort.npy"))
    manifests = list((tmp_path / "cache").glob("*/manifest.json"))
    assert len(manifests) == 1 and '"head_shared": true' in manifests[0].read_text()


def test_build_with_head_budgets_sizes_the_cache_for_the_largest_head(head_budgets,
                                                                       tmp_path) -> None:
    out = tmp_path / "art"
    built = run("build", *TINY, "--budget", "2lines", "--head-budgets", str(head_budgets),
                "--out", str(out))
    assert built.exit_code == 0, built.output
    config = get_config("GPT-tiny-gqa")
    layout = SequenceLayout.for_image(config, 16)
    table = load_head_budgets(head_budgets).tables[8]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["head_shared"] and manifest["build"]["attention"] == "gqa"
    assert manifest["capacity"] == layout.prefix + int(table.max()) + layout.width
    assert "per-head budgets" in built.output
    common = ["--classes", "3", "--budget", "2lines", "--temperature", "0", "--head-budgets",
              str(head_budgets)]
    ort_run = run("generate", "--engine", "ort", "--artifact", str(out), *common,
                  "--save-tokens", str(tmp_path / "ort.npy"))
    torch_run = run("generate", *TINY, *common, "--save-tokens", str(tmp_path / "torch.npy"))
    assert ort_run.exit_code == 0 and torch_run.exit_code == 0, ort_run.output + torch_run.output
    assert np.array_equal(np.load(tmp_path / "torch.npy"), np.load(tmp_path / "ort.npy"))
    plain = run("generate", "--engine", "ort", "--artifact", str(out), *common[:-2])
    assert plain.exit_code == 0, plain.output  # a uniform budget fits the larger cache too
    bad = run("build", *TINY, "--budget", "3lines", "--head-budgets", str(head_budgets),
              "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "no table for a budget of 12" in bad.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("args", "phrase"), [
    (["--policy", "streaming", "--budget", "2lines"], "drop it for --policy streaming"),
    (["--budget", "3lines"], "no table for a budget of 12"),
    (["--budget", "2lines", "--recent-lines", "2"], "pass the same --recent-lines"),
    (["--budget", "2lines", "--lookahead", "2"], "pass --lookahead 4"),
])
def test_head_budgets_that_do_not_fit_are_one_sentence(head_budgets, args, phrase) -> None:
    result = run("generate", *TINY, "--classes", "1", "--head-budgets", str(head_budgets), *args)
    assert result.exit_code == 2, result.output
    assert phrase in result.output and result.output.strip().count("\n") == 0


def test_calibrate_bad_input(tmp_path) -> None:
    out = tmp_path / "hb.safetensors"
    result = run("calibrate", *TINY, "--source", "demo-data", "--out", str(out))
    assert result.exit_code == 2 and "--source samples" in result.output
    out.write_text("keep me")
    result = run("calibrate", *TINY, "--out", str(out))
    assert result.exit_code == 2 and "--force" in result.output and out.read_text() == "keep me"
    result = run("calibrate", *TINY, "--budgets", "1/1", "--images", "1", "--out",
                 str(tmp_path / "none.safetensors"))
    assert result.exit_code == 2 and "No budget given evicts" in result.output
    assert not (tmp_path / "none.safetensors").exists()
