"""Metrics against closed forms, and the sweep's honest invariants on a tiny model."""

from __future__ import annotations

import numpy as np
import torch

from linear_export.engines.torch import TorchEngine
from linear_export.evaluation.metrics import frechet_distance, token_agreement
from linear_export.evaluation.report import kept_cells_plot, markdown_table, metrics_plot
from linear_export.evaluation.sweep import (
    EvalSettings,
    EvalSubject,
    paired_standard_error,
    run_sweep,
)
from linear_export.models.vq import VQ_CONFIGS, VQModel
from linear_export.runtime.sampling import SamplingConfig

from conftest import tiny_model


def test_paired_standard_error_is_that_of_the_differences() -> None:
    generator = np.random.default_rng(1)
    reference = generator.normal(size=400)
    values = reference + generator.normal(0.5, 2.0, size=400)  # differences: sd 2, n 400
    error = paired_standard_error(torch.tensor(values), torch.tensor(reference))
    assert abs(error - 2.0 / 20) < 0.01
    # A shared per-image offset is no noise: pairing removes it.
    assert paired_standard_error(torch.tensor(reference + 3), torch.tensor(reference)) < 1e-12
    assert paired_standard_error(torch.tensor([1.0]), torch.tensor([0.0])) == 0.0


def test_frechet_distance_closed_forms() -> None:
    generator = np.random.default_rng(0)
    samples = generator.normal(size=(4000, 3))
    assert frechet_distance(samples, samples) < 1e-6
    shifted = samples + np.array([1.0, 2.0, 0.0])
    assert abs(frechet_distance(samples, shifted) - 5.0) < 1e-6  # |mean shift|^2, same cov
    scaled = samples * 3.0  # cov 9I vs I: trace(I + 9I - 2*3I) = 4 per dim
    assert abs(frechet_distance(samples, scaled) - 12.0) < 0.5


def test_token_agreement() -> None:
    reference = torch.tensor([[1, 2], [3, 4]])
    assert token_agreement(reference, reference) == 1.0
    assert token_agreement(torch.tensor([[1, 0], [3, 0]]), reference) == 0.5


PROJECTION = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))


def judge(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stand-in classifier: mean colour per channel as features, projected to logits."""
    features = images.mean(dim=(2, 3))
    return features @ PROJECTION, features


def test_sweep_invariants_on_a_tiny_model() -> None:
    model = tiny_model(height=4, width=4)
    torch.manual_seed(0)
    vq = VQModel(VQ_CONFIGS["VQ-tiny"]).eval()
    real_codes = torch.randint(0, 64, (12, 4, 4))
    with torch.no_grad():
        real = vq.decode_codes(real_codes)
    subject = EvalSubject(TorchEngine(model), vq.decode_codes, judge, real, real_codes,
                          torch.arange(12) % 10)
    settings = EvalSettings(policies=("full", "linear", "window"), budgets=("1.0", "1/4"),
                            classes=(1, 2, 3), samples_per_class=4, batch_size=6,
                            sampling=SamplingConfig(cfg_scale=2.0, top_k=0))
    result = run_sweep(subject, settings)
    rows = {(row.policy, row.budget): row for row in result.rows}
    assert rows[("full", "all")].agreement == 1.0 and rows[("full", "all")].nll_delta == 0
    assert rows[("full", "all")].nll_delta_se_pct == 0
    # A whole-image budget is the full cache: same tokens, same likelihood.
    assert rows[("linear", "1.0")].agreement == 1.0
    assert abs(rows[("linear", "1.0")].nll_delta) < 1e-9
    quarter = rows[("linear", "1/4")]
    assert quarter.capacity == 1 + 4 + 4 and np.isfinite(quarter.nll_delta)
    assert quarter.agreement < 1.0
    assert all(np.isfinite(row.frechet) and row.frechet_noise >= 0 for row in result.rows)
    assert set(result.kept_cells) and all(
        cells.shape == (2, 4, 4) and cells.max() <= 1 for cells in result.kept_cells.values()
    )
    # After the first eviction LineAR holds exactly `budget` image cells per (row, head).
    last = result.kept_cells[list(result.kept_cells)[-1]]
    assert np.allclose(last.sum(axis=(1, 2)), 4)
    table = markdown_table(result)
    assert table.count("\n| linear |") == 2
    assert metrics_plot(result).startswith(b"\x89PNG")
    assert kept_cells_plot(result).startswith(b"\x89PNG")


def test_eval_quick_on_the_bundled_demo(tmp_path) -> None:
    """`eval --quick` end to end: what it can honestly assert on a handful of samples."""
    import json

    import pytest
    from click.testing import CliRunner

    from linear_export.cli import main
    from linear_export.demo import DEMO_DIR

    if not (DEMO_DIR / "gpt.safetensors").is_file():
        pytest.skip("the demo weights are not in this checkout")
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(row["policy"], row["budget"]): row
            for row in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows[("full", "all")]["agreement"] == 1.0
    assert rows[("linear", "1/1")]["agreement"] == 1.0  # budget 1 is the full cache
    assert rows[("linear", "1/1")]["nll_delta"] == 0.0
    assert np.isfinite(rows[("linear", "1/4")]["nll_delta"])
    assert rows[("linear", "1/4")]["capacity"] == 1 + 64 + 16
    assert {"eval.md", "metrics.png", "kept_cells.png", "samples_linear.png"} <= {
        path.name for path in out.iterdir()}
    again = CliRunner().invoke(main, ["eval", "--quick", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


def test_eval_runs_the_demo_on_an_int8_ort_artifact(tmp_path) -> None:
    """`eval --engine ort --weights int8`: the same sweep through a quantized artifact; every
    policy runs in its full-capacity cache and reports the capacity it needs."""
    import json

    import pytest
    from click.testing import CliRunner

    from linear_export.cli import main
    from linear_export.demo import DEMO_DIR

    if not (DEMO_DIR / "gpt.safetensors").is_file():
        pytest.skip("the demo weights are not in this checkout")
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval", "--quick", "--engine", "ort", "--weights", "int8",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(row["policy"], row["budget"]): row
            for row in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows[("linear", "1/1")]["agreement"] == 1.0
    assert rows[("linear", "1/4")]["capacity"] == 1 + 64 + 16
    refused = CliRunner().invoke(main, ["eval", "--quick", "--weights", "int8",
                                        "--out", str(tmp_path / "other")])
    assert refused.exit_code == 2 and "pass --engine ort" in refused.output
