"""`linear-export bench`: a quick run's JSON is complete and self-consistent; bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from linear_export.cli import main
from linear_export.runtime.bench import (
    BASELINE,
    BenchConfig,
    Job,
    Measurement,
    available_engines,
    max_batch,
    measure,
    parse_size,
)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "out"
    result = run("bench", "--quick", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")
    assert "| engine | policy |" in (out / "bench.md").read_text()
    return json.loads((out / "bench.json").read_text())


def test_quick_bench_reports_every_engine_and_policy(quick: dict) -> None:
    config = quick["config"]
    keys = {(r["engine"], r["policy"]) for r in quick["results"]}
    expected = {(e, p) for e in config["engines"] for p in config["policies"]}
    assert keys == expected | {(BASELINE, "full")}
    assert "full" in config["policies"] and len(config["policies"]) >= 2
    for result in quick["results"]:
        for name in ("images_per_s", "step_ms", "kv_bytes", "kv_capacity", "peak_rss_bytes"):
            assert result[name] > 0, (result["engine"], result["policy"], name)
        assert len(result["runs"]) == config["repeats"]


def test_ratios_are_value_over_reference(quick: dict) -> None:
    index = {(r["engine"], r["policy"], r["batch"]): r for r in quick["results"]}
    for result in quick["results"]:
        baseline = index[(BASELINE, "full", result["batch"])]
        full = index.get((result["engine"], "full", result["batch"]))
        for name, ratio in result["vs_baseline"].items():
            assert ratio == pytest.approx(result[name] / baseline[name], rel=1e-12)
        if result["engine"] == BASELINE:
            assert result["vs_full"] is None
            continue
        for name, ratio in result["vs_full"].items():
            assert ratio == pytest.approx(result[name] / full[name], rel=1e-12)


def test_linear_reports_its_line_end_score_call_and_its_share_of_a_line(quick: dict) -> None:
    """LineAR's score call (once per line) is timed in the generation; its share is of the
    line's decode steps (width x the run's median step); policies that never score have none."""
    from linear_export.models import get_config

    width = quick["config"]["image_size"] // get_config(quick["config"]["model"]).downsample
    scored = [r for r in quick["results"] if r["policy"].startswith("linear")]
    assert scored
    for result in quick["results"]:
        if result not in scored:
            assert result["score_ms"] is None and result["score_share"] is None
            continue
        assert result["score_ms"] > 0
        for run in result["runs"]:
            assert run["score_share"] == pytest.approx(
                run["score_ms"] / (width * run["step_ms"]), rel=1e-9)


def test_kv_bytes_are_exactly_capacity_proportional(quick: dict) -> None:
    from linear_export.models import get_config

    model = get_config(quick["config"]["model"])
    rows = 2 * quick["config"]["batch_sizes"][0]  # CFG doubles the rows
    per_slot = 2 * model.n_layer * rows * model.kv_heads * model.head_dim * 4  # fp32
    torch_runs = [r for r in quick["results"] if r["engine"] == "torch"]
    full = next(r for r in torch_runs if r["policy"] == "full")
    assert full["kv_capacity"] == 1 + (quick["config"]["image_size"] // 4) ** 2
    for result in quick["results"]:
        assert result["kv_bytes"] == per_slot * result["kv_capacity"]
    linear = next(r for r in torch_runs if r["policy"].startswith("linear"))
    assert linear["kv_capacity"] < full["kv_capacity"]
    assert linear["kv_bytes"] * full["kv_capacity"] == full["kv_bytes"] * linear["kv_capacity"]
    baseline = next(r for r in quick["results"] if r["engine"] == BASELINE)
    assert baseline["kv_capacity"] % 8 == 0 and baseline["kv_capacity"] >= full["kv_capacity"]


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--policies", "full,lineaar:1/4"], "Unknown policy 'lineaar:1/4'"),
        (["--policies", "linear:7/4"], "--budget '7/4'"),
        (["--memory-limit", "8XB"], "--memory-limit '8XB' is not a size"),
        (["--engines", "torch,tvm"], "Unknown engine 'tvm'"),
        (["--batch-sizes", "0"], "--batch-sizes '0'"),
        (["--fit-batches", "2,2"], "two different batch sizes"),
        (["--policies", "linear:1/4:lookahaed=0"], "'lookahaed=0' is not a policy knob"),
        (["--policies", "linear:1/4:lookahead=x"], "Knob lookahead takes a whole number"),
        (["--policies", "linear:1/4:lookahead=9"], "--lookahead 9 is out of range"),
        (["--policies", "full:anchor=2"], "full keeps the whole cache"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(args: list[str], phrase: str) -> None:
    result = run("bench", "--quick", *args)
    assert result.exit_code == 2, result.output
    assert phrase in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")


def test_unreadable_checkpoint_fails_in_the_child_with_one_sentence(tmp_path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    result = run("bench", "--quick", "--checkpoint", str(tmp_path / "bad.pt"))
    assert result.exit_code == 2 and "cannot be read" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_existing_out_needs_force(tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("keep me")
    result = run("bench", "--quick", "--out", str(tmp_path))
    assert result.exit_code == 2 and "--force" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "keep.txt").read_text() == "keep me"


def test_parse_size_units() -> None:
    assert parse_size("8GiB") == 8 * 2**30 == parse_size("8g")
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("1.5 MiB") == 3 * 2**19
    assert parse_size("4096") == 4096


def test_tensorrt_is_skipped_with_a_reason() -> None:
    chosen, skipped = available_engines("torch,tensorrt", "cpu")
    assert chosen == ["torch"] and "tensorrt" in skipped and skipped["tensorrt"]


def fake(rss: callable, seconds: float = 1.0):
    """A runner that records the jobs it is given and reports RSS as a function of the batch."""
    jobs: list[Job] = []

    def runner(job: Job) -> Measurement:
        jobs.append(job)
        return Measurement(seconds, job.batch, 10.0, 1, 1, int(rss(job.batch)), None)

    return runner, jobs


def test_configurations_alternate_within_each_repeat() -> None:
    config = BenchConfig(model="GPT-tiny", image_size=16, policies=("full", "linear:1/2"),
                         repeats=3, batch_sizes=(2,))
    runner, jobs = fake(lambda b: 100)
    lines: list[str] = []
    measure(config, runner=runner, progress=False, log=lines.append)
    keys = [job.key for job in jobs]
    # One line per finished run, in order, for logs that show no progress bar.
    assert len(lines) == 9 and lines[0].startswith("run 1/9: ") and "run 9/9: " in lines[-1]
    assert all("1.0 s, 2 images/s, 10.0 ms/step" in line for line in lines)
    per_repeat = len(keys) // 3
    assert per_repeat == 3  # baseline, torch full, torch linear
    for repeat in range(3):  # every repeat runs every configuration once
        assert len(set(keys[repeat * per_repeat:(repeat + 1) * per_repeat])) == per_repeat
    assert keys[0] != keys[per_repeat]  # rotated: not always the same one first


def test_the_reference_is_its_fastest_run_and_engines_their_median() -> None:
    """LlamaGen's loop runs at two speeds from process to process: ratios are against its
    best run (the conservative side), engines keep their medians."""
    from linear_export.runtime.bench import ORIGINAL, Result

    config = BenchConfig(model="GPT-tiny", image_size=16, repeats=3)

    def runs(seconds: list[float]) -> list[Measurement]:
        return [Measurement(s, 8, 1e3 * s / 256, 1, 1, 1, None) for s in seconds]

    reference = Result.from_runs(Job(ORIGINAL, "full", 8, config), runs([70.0, 35.0, 75.0]))
    engine = Result.from_runs(Job("ort", "full", 8, config), runs([10.0, 12.0, 11.0]))
    assert reference.images_per_s == pytest.approx(8 / 35.0)
    assert reference.step_ms == pytest.approx(1e3 * 35.0 / 256)
    assert engine.images_per_s == pytest.approx(8 / 11.0)  # the median
    assert engine.ratios(reference)["images_per_s"] == pytest.approx(35.0 / 11.0)


def test_max_batch_fits_predicts_and_confirms() -> None:
    config = BenchConfig(memory_limit=1000, fit_batches=(1, 4))
    runner, jobs = fake(lambda b: 100 + 10 * b)
    found = max_batch(config, "torch", "full", {}, runner=runner)
    assert (found.fixed_bytes, found.per_image_bytes) == (100, 10)
    assert found.predicted == found.batch == 90 and found.peak_rss_bytes == 1000
    assert [job.batch for job in jobs] == [1, 4, 90]


def test_max_batch_steps_down_when_the_fit_overshoots() -> None:
    config = BenchConfig(memory_limit=1000, fit_batches=(1, 2))
    runner, _ = fake(lambda b: 100 + 10 * b + b * b)  # grows faster than the fitted line
    found = max_batch(config, "torch", "full", {}, runner=runner)
    assert found.predicted > found.batch and found.peak_rss_bytes <= 1000
    assert len(found.tried) >= 2 and found.tried[0][1] > 1000
    runner, _ = fake(lambda b: 5000 + b)
    assert max_batch(config, "torch", "full", {}, runner=runner).note.startswith("the fixed")
    runner, _ = fake(lambda b: 500 - b)
    assert "did not grow" in max_batch(config, "torch", "full", {}, runner=runner).note


def test_child_peak_rss_is_its_own_not_the_parents() -> None:
    ballast = bytearray(1 << 30)  # 1 GiB touched in this (parent) process
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])
    code = "from linear_export.runtime.bench_child import peak_rss_bytes; print(peak_rss_bytes())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert int(done.stdout) < 1 << 30
    del ballast
