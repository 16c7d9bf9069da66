"""TensorRT plans and TrtEngine: pure profile/manifest logic here, the engine itself on a GPU.

The tests that need TensorRT and CUDA skip with the reason; the rest run on any machine.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from artifact_fixtures import built, one_torch_thread  # noqa: F401
from click.testing import CliRunner

from linear_export.cli import main
from linear_export.engines import ENGINES, make_engine
from linear_export.errors import UserError
from linear_export.export.artifact import load_artifact
from linear_export.export.tensorrt import (
    PLAN_NAMES,
    TIMING_CACHE,
    GiB,
    Profile,
    TrtBuildConfig,
    check_plan_compatible,
    default_opt_batch,
    input_shape_ranges,
    profile_specs,
    skip_reason,
    tensorrt_record,
    unavailable_reason,
    with_plans,
)
from linear_export.models.attention import DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
USABLE = HAS_TENSORRT and torch.cuda.is_available()
needs_tensorrt = pytest.mark.skipif(
    not USABLE, reason="needs the tensorrt package and a CUDA GPU (NVIDIA machines only)")
without_tensorrt = pytest.mark.skipif(
    USABLE, reason="checks the error shown where TensorRT cannot run; it can run here")
TINY = ["--model", "GPT-tiny", "--image-size", "24", "--random-weights"]

# The step graph's IO as the manifest records it (per-layer cache, dynamo's symbol names).
INPUTS = [
    {"name": "input_ids", "dtype": "int64", "shape": ["s0", "s1"]},
    {"name": "position_ids", "dtype": "int64", "shape": ["s0", "s1"]},
    {"name": "past_key.0", "dtype": "float16", "shape": ["s0", 2, 40, 16]},
    {"name": "past_value.0", "dtype": "float16", "shape": ["s0", 2, 40, 16]},
    {"name": "cache_len", "dtype": "int64", "shape": []},
]


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_profiles_decode_only_when_the_prefix_is_one_token() -> None:
    assert profile_specs(1, 64, 16) == [
        Profile("decode", (1, 16, 64), (1, 1, 1), (1, DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD))]
    decode, prefill = profile_specs(120, 32, 8)
    assert decode.steps == (1, 1, 1) and prefill.steps == (2, 120, 120)
    assert decode.batch == prefill.batch == (1, 8, 32)
    assert prefill.covers(32, 120) and not prefill.covers(33, 120) and not prefill.covers(4, 1)
    # Scoring rotations of the step's queries: one to MAX_LOOKAHEAD (0: the graph has none).
    assert decode.covers(4, 1, MAX_LOOKAHEAD) and not decode.covers(4, 1, MAX_LOOKAHEAD + 1)
    assert decode.covers(4, 1, 0) and prefill.covers(4, 120, MAX_LOOKAHEAD)
    assert default_opt_batch(64) == 16 and default_opt_batch(4) == 4


def test_shape_ranges_follow_the_symbols_of_input_ids() -> None:
    decode, prefill = profile_specs(3, 16, 4)
    ranges = input_shape_ranges(INPUTS, decode)
    assert set(ranges) == {"input_ids", "position_ids", "past_key.0", "past_value.0"}
    assert ranges["input_ids"] == ((1, 1), (4, 1), (16, 1))
    assert ranges["past_key.0"] == ((1, 2, 40, 16), (4, 2, 40, 16), (16, 2, 40, 16))
    assert input_shape_ranges(INPUTS, prefill)["position_ids"] == ((1, 2), (4, 3), (16, 3))
    scored = INPUTS + [{"name": "score_position_ids", "dtype": "int64",
                        "shape": ["s0", "s2", "s1"]}]
    assert input_shape_ranges(scored, decode)["score_position_ids"] == (
        (1, 1, 1), (4, DEFAULT_LOOKAHEAD, 1), (16, MAX_LOOKAHEAD, 1))
    odd = INPUTS + [{"name": "extra", "dtype": "int64", "shape": ["s9"]}]
    with pytest.raises(ValueError, match="s9"):
        input_shape_ranges(odd, decode)


def test_build_config_rejects_impossible_values() -> None:
    with pytest.raises(UserError, match="--trt-opt-batch 20"):
        TrtBuildConfig(max_batch=16, opt_batch=20)
    with pytest.raises(UserError, match="--trt-workspace"):
        TrtBuildConfig(max_batch=16, opt_batch=4, workspace_bytes=10)
    assert TrtBuildConfig(max_batch=16, opt_batch=16).workspace_bytes == 4 * GiB


def test_w8a8_weights_are_not_built_into_tensorrt_plans(tmp_path) -> None:
    """w8a8's MatMulInteger does not parse in TensorRT: one sentence before any export, and
    nothing written (int8/int4 go as DequantizeLinear, test_quantize.py)."""
    import linear_export as le

    source = le.ModelSource(model="GPT-tiny", image_size=24, random_weights=True)
    with pytest.raises(UserError, match="--weights w8a8 makes ONNX Runtime's own integer"):
        le.build(source, tmp_path / "art", weights="w8a8",
                 tensorrt=TrtBuildConfig(max_batch=8, opt_batch=4))
    assert not (tmp_path / "art").exists()


def test_manifest_records_plans_version_and_gpu() -> None:
    config = TrtBuildConfig(max_batch=16, opt_batch=8, timing_cache="/somewhere/shared.cache")
    record = tensorrt_record(trt_version="11.2.1", gpu="NVIDIA H200", capability="9.0",
                             config=config, profiles=profile_specs(1, 16, 8),
                             plans={"step.onnx": "step.plan"}, seconds=12.3456)
    assert record["version"] == "11.2.1" and record["gpu"] == "NVIDIA H200"
    assert record["strongly_typed"] and not record["tf32"] and record["max_batch"] == 16
    assert record["profiles"] == [{"name": "decode", "batch": (1, 8, 16), "steps": (1, 1, 1),
                                   "rotations": (1, DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD)}]
    assert "/somewhere" not in str(record) and record["timing_cache"] == TIMING_CACHE
    assert record["build_seconds"] == 12.346
    manifest = {"files": {"step.onnx": {"sha256": "a", "bytes": 1},
                          "step.plan": {"sha256": "stale", "bytes": 9}}}
    plan = {"step.plan": {"sha256": "b", "bytes": 2}}
    updated = with_plans(manifest, record, plan)
    assert updated["files"] == {"step.onnx": {"sha256": "a", "bytes": 1}, **plan}
    assert updated["tensorrt"] is record and "tensorrt" not in manifest  # a copy
    assert set(PLAN_NAMES) == {"step.onnx", "step_decode.onnx", "score.onnx"}


def test_plans_from_another_gpu_or_version_are_refused() -> None:
    record = {"version": "10.13.3", "gpu": "NVIDIA A100-SXM4-80GB"}
    check_plan_compatible(record, "10.13.3", "NVIDIA A100-SXM4-80GB", "art")
    with pytest.raises(UserError, match="no TensorRT plans; build it with"):
        check_plan_compatible(None, "10.13.3", "x", "art")
    with pytest.raises(UserError, match="built with TensorRT 10.13.3, this is 11.2.1"):
        check_plan_compatible(record, "11.2.1", "NVIDIA A100-SXM4-80GB", "art")
    with pytest.raises(UserError, match="built for NVIDIA A100-SXM4-80GB, this GPU is NVIDIA "
                                        "H200; rebuild"):
        check_plan_compatible(record, "10.13.3", "NVIDIA H200", "art")


def test_engine_is_registered_and_needs_an_artifact() -> None:
    assert "tensorrt" in ENGINES
    with pytest.raises(UserError, match="--artifact DIR from linear-export build --tensorrt"):
        make_engine("tensorrt")
    with pytest.raises(UserError, match="--cuda-graph applies to the torch engine"):
        make_engine("tensorrt", artifact="x", cuda_graph=True)


@without_tensorrt
def test_unavailable_tensorrt_is_one_clear_sentence(tmp_path) -> None:
    reason = unavailable_reason()
    assert reason is not None
    assert ("tensorrt package is not installed" in reason) if not HAS_TENSORRT \
        else ("CUDA GPU" in reason)
    with pytest.raises(UserError, match="^TensorRT is unavailable: .*\\.$"):
        make_engine("tensorrt", artifact=tmp_path)
    assert skip_reason({"tensorrt": {"version": "1", "gpu": "g"}}, "art") == reason


@without_tensorrt
def test_build_tensorrt_without_it_exits_2_and_writes_nothing(tmp_path) -> None:
    out = tmp_path / "deep" / "art"
    result = run("build", *TINY, "--tensorrt", "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is unavailable: ")
    assert "pip install" in lines[0] or "GPU" in lines[0]
    assert not out.exists() and not out.parent.exists()  # checked before any export


@without_tensorrt
def test_verify_says_why_tensorrt_is_skipped(tmp_path) -> None:
    artifact = tmp_path / "art"
    shutil.copytree(built("GPT-tiny"), artifact, ignore=shutil.ignore_patterns(".ort"))
    result = run("verify", artifact, "--policy", "full", "--batch", "1", "--cfg-scale", "1.0")
    assert result.exit_code == 0, result.output
    assert "note: TensorRT comparison skipped: " in result.output
    assert "ort vs torch (cpu):" in result.output and "PASS" in result.output


# ---- on an NVIDIA GPU with TensorRT ----------------------------------------------------------


@pytest.fixture(scope="module")
def trt_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "tiny"
    result = run("build", *TINY, "--policy", "full", "--max-batch", "8",
                 "--tensorrt", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@needs_tensorrt
def test_build_records_plans_for_this_gpu(trt_artifact) -> None:
    import tensorrt

    manifest = load_artifact(trt_artifact).manifest  # hashes of the plans included
    record = manifest["tensorrt"]
    assert record["version"] == tensorrt.__version__
    assert record["gpu"] == torch.cuda.get_device_name()
    assert set(record["plans"].values()) <= set(manifest["files"])
    assert (trt_artifact / TIMING_CACHE).stat().st_size > 0


@needs_tensorrt
@pytest.mark.parametrize("policy", ["full", "linear"])
def test_tensorrt_matches_torch_on_cuda(trt_artifact, policy) -> None:
    from linear_export.engines.tensorrt import TrtEngine
    from linear_export.engines.torch import TorchEngine
    from linear_export.export.reference import reference_model
    from linear_export.runtime.policies import Policy, PolicyConfig, fit_policy
    from linear_export.runtime.verify import compare_engines, format_report

    artifact = load_artifact(trt_artifact)
    engine = TrtEngine(artifact, device="cuda")
    reference = TorchEngine(reference_model(artifact).to("cuda"))
    budget = None if policy == "full" else 2 * artifact.layout.width
    chosen = fit_policy(Policy(PolicyConfig(policy, budget=budget), artifact.layout),
                        artifact.capacity)
    report = compare_engines(reference, engine, chosen, [1, 2], cfg_scale=4.0,
                             dtype_name="fp32", seed=0)
    assert report.passed, format_report(report)


@needs_tensorrt
def test_verify_compares_tensorrt_ort_and_torch(trt_artifact) -> None:
    result = run("verify", trt_artifact, "--device", "cuda", "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "tensorrt vs torch" in result.output and "PASS" in result.output


@needs_tensorrt
def test_fp16_plans_are_strongly_typed_from_the_graph(tmp_path) -> None:
    out = tmp_path / "fp16"
    result = run("build", *TINY, "--dtype", "fp16", "--policy", "full", "--max-batch", "4",
                 "--tensorrt", "--out", out)
    assert result.exit_code == 0, result.output
    engine = make_engine("tensorrt", artifact=out, device="cuda")
    assert engine.dtype == torch.float16
    verified = run("verify", out, "--device", "cuda", "--batch", "1", "--policy", "full")
    assert verified.exit_code == 0, verified.output


@needs_tensorrt
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_weight_only_plans_build_and_verify(tmp_path, weights: str) -> None:
    """--weights int8|int4 reach TensorRT as DequantizeLinear -> MatMul; the plans pass
    verify at that precision's recorded tolerances, against torch and against ort."""
    out = tmp_path / weights
    result = run("build", *TINY, "--dtype", "fp16", "--weights", weights, "--policy", "full",
                 "--max-batch", "4", "--tensorrt", "--out", out)
    assert result.exit_code == 0, result.output
    verified = run("verify", out, "--device", "cuda", "--batch", "1", "--policy", "full")
    assert verified.exit_code == 0, verified.output
    assert "tensorrt vs torch" in verified.output and f"{weights} tolerances" in verified.output
