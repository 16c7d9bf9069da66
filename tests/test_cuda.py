"""The GPU path without TensorRT: torch and ORT engines on CUDA, the CUDA-graph decode step.

On CPU-only machines the CUDA tests skip with the reason; the errors and scripts/gpu-check.sh
(which must report that CUDA is absent and exit 0) are tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from artifact_fixtures import built, model_for, one_torch_thread  # noqa: F401
from click.testing import CliRunner

from linear_export.cli import main
from linear_export.engines import make_engine
from linear_export.engines.torch import TorchEngine
from linear_export.errors import UserError
from linear_export.runtime.bench import Measurement, Result
from linear_export.runtime.generate import generate
from linear_export.runtime.policies import Policy, PolicyConfig
from linear_export.runtime.sampling import SamplingConfig
from linear_export.runtime.verify import compare_engines, format_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch sees none)")
GREEDY = SamplingConfig(cfg_scale=4.0, temperature=0.0)


def policies(layout) -> list[Policy]:
    return [Policy(PolicyConfig("full"), layout),
            Policy(PolicyConfig("linear", budget=2 * layout.width), layout)]


def test_cuda_graph_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="--cuda-graph needs a CUDA device but the model is on "
                                        "'cpu'; pass --device cuda or drop --cuda-graph"):
        TorchEngine(model_for(), cuda_graph=True)
    with pytest.raises(UserError, match="applies to the torch engine, not ort"):
        make_engine("ort", artifact="x", cuda_graph=True)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only error; this machine has CUDA")
def test_cli_cuda_graph_without_cuda_exits_2() -> None:
    runner = CliRunner()
    bench = runner.invoke(main, ["bench", "--quick", "--cuda-graph"])
    assert bench.exit_code == 2 and "--cuda-graph needs --device cuda" in bench.output
    generate_cli = runner.invoke(main, ["generate", "--model", "GPT-tiny", "--image-size", "24",
                                        "--random-weights", "--classes", "1", "--no-decode",
                                        "--cuda-graph"])
    assert generate_cli.exit_code == 2, generate_cli.output
    assert generate_cli.output.count("\n") == 1 and "--cuda-graph" in generate_cli.output


def test_eager_torch_engine_has_no_per_step_cache_len_copy() -> None:
    # cache_len is filled into one persistent tensor (a kernel on CUDA, no host round trip).
    engine = TorchEngine(model_for())
    buffer = engine._cache_len
    generate(engine, [1, 2], policies(engine.layout)[1], GREEDY)
    assert engine._cache_len is buffer and buffer.shape == ()


@pytest.mark.skipif(CUDA, reason="checks the CPU-only report; this machine has CUDA")
def test_gpu_check_reports_absent_cuda_and_exits_0(tmp_path) -> None:
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CUDA is absent" in done.stdout and "torch " in done.stdout
    assert "onnxruntime" in done.stdout and "tensorrt" in done.stdout
    assert "CPU sanity check passed." in done.stdout, done.stdout
    assert (tmp_path / "cpu-sanity" / "tokens.npy").is_file()


def test_bench_table_merges_runs_under_one_header(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "scripts" /
                                                  "bench_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.table
    for model, step_ms in (("GPT-B", 9.5), ("GPT-XL", 30.25)):
        runs = [Measurement(2.0, 8, step_ms, 65, 2**20, 2**30, 2**31)]
        result = Result("torch", "linear:1/4", 8, 4.0, step_ms, 65, 2**20, 2**30, 2**31, runs)
        report = {"config": {"model": model, "image_size": 256, "dtype": "fp16",
                             "cuda_graph": True}, "results": [asdict(result)]}
        (tmp_path / model).mkdir()
        (tmp_path / model / "bench.json").write_text(json.dumps(report))
    text = table([tmp_path / "GPT-B", tmp_path / "missing", tmp_path / "GPT-XL"])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "engine", "policy"]
    assert len(lines) == 4 and "GPT-B 256px fp16 cuda-graph" in lines[2]
    assert "30.2" in lines[3] and "peak CUDA MiB" in lines[0]


# ---- on a CUDA GPU -----------------------------------------------------------------------


@needs_cuda
def test_torch_engine_on_cuda_matches_cpu() -> None:
    cpu = TorchEngine(model_for())
    cuda = TorchEngine(model_for().to("cuda"))
    for policy in policies(cpu.layout):
        want = generate(cpu, [1, 7], policy, GREEDY).tokens
        got = generate(cuda, [1, 7], policy, GREEDY).tokens
        assert torch.equal(want, got), policy.name


@needs_cuda
@pytest.mark.parametrize("policy_index", [0, 1])
def test_cuda_graph_replays_the_eager_step(policy_index) -> None:
    model = model_for().to("cuda")
    eager, graphed = TorchEngine(model), TorchEngine(model, cuda_graph=True)
    policy = policies(model.layout)[policy_index]
    report = compare_engines(eager, graphed, policy, [2, 3], cfg_scale=4.0, dtype_name="fp32")
    assert report.passed, format_report(report)
    assert graphed.graphs._graphs  # decode steps did go through a captured graph
    # A second generation allocates a new cache: the graph is captured again, still equal.
    again = generate(graphed, [2, 3], policy, GREEDY).tokens
    assert torch.equal(again, generate(eager, [2, 3], policy, GREEDY).tokens)


@needs_cuda
def test_ort_engine_on_cuda_matches_torch() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from linear_export.engines.ort import OrtEngine
    from linear_export.runtime.policies import fit_policy

    engine = OrtEngine(built("GPT-tiny", split_cache=True), device="cuda")
    reference = TorchEngine(model_for().to("cuda"))
    for policy in policies(reference.layout):
        fitted = fit_policy(policy, engine.capacity)
        report = compare_engines(reference, engine, fitted, [1, 2], cfg_scale=4.0,
                                 dtype_name="fp32")
        assert report.passed, format_report(report)
