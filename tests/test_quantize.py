"""Low-precision artifacts (export/quantize.py): weight-only int8/int4 (MatMulNBits) and
w8a8 (dynamic int8 MatMulInteger) in every graph that has weights, one shared weight file, and
steps close to the fp32 model's."""

from __future__ import annotations

import onnx
import pytest
import torch
from artifact_fixtures import _ROOT, model_for
from test_onnx_export import step_inputs

from linear_export.engines.ort import OrtEngine
from linear_export.errors import UserError
from linear_export.export.artifact import build_artifact, load_artifact
from linear_export.export.quantize import count_quantized


def quantized(weight_format: str):
    out = _ROOT / f"GPT-tiny-{weight_format}"
    if not out.exists():
        model = model_for()
        build_artifact(model, out, model_name="GPT-tiny", image_size=24,
                       weights={"source": "random", "seed": 0, "std": 0.2},
                       capacity=model.layout.length, build_options={"policy": "full"},
                       max_batch=8, split_cache=True, weight_format=weight_format)
    return out


# Largest logit error as a share of the largest logit, on this tiny model's big activations
# (int8 compute quantizes them too): measured 5% (int8) and 39% (int4); the demo model's
# quality under each is measured with eval (docs/speed.md).
@pytest.mark.parametrize(("weight_format", "share"),
                         [("int8", 0.1), ("int4", 0.6), ("w8a8", 0.2)])
def test_quantized_steps_stay_close_to_fp32(weight_format: str, share: float) -> None:
    directory = quantized(weight_format)
    artifact = load_artifact(directory)
    assert artifact.weight_format == weight_format
    for name in ("step.onnx", "step_decode.onnx"):
        graph = onnx.load(str(directory / name), load_external_data=False).graph
        weights = {tensor.name for tensor in graph.initializer}
        assert count_quantized(directory / name) == 2 * 5 + 1  # per layer qkv, wo, w1-w3; head
        assert not [node for node in graph.node
                    if node.op_type == "MatMul" and node.input[1] in weights]
    assert sorted(path.name for path in directory.glob("*.data")) == ["step.onnx.data"]
    model, engine = model_for(), OrtEngine(directory)
    ids, positions, cache = step_inputs(model, 3, 1, 9, torch.float32, engine.capacity)
    with torch.no_grad():
        want = model.decode(ids, positions, cache.key.clone(), cache.value.clone(),
                            cache.cache_len_tensor())
    out = engine.step(ids, positions, cache)
    error = (out.logits - want[0]).abs().max().item()
    print(f"{weight_format}: {error / want[0].abs().max().item():.3f} of the largest logit")
    assert 0 < error < share * want[0].abs().max().item()  # changed, but not by much


def test_w8a8_runs_as_one_fused_dynamic_quantized_matmul() -> None:
    """The session fuses DynamicQuantizeLinear + MatMulInteger + scale into ONNX Runtime's
    DynamicQuantizeMatMul (u8s8 VNNI GEMMs in MLAS): checked in its optimized model. The
    SwiGLU's w1 and w3 share one input, quantized once (DynamicQuantizeLinear) and read by two
    MatMulIntegerToFloat, the same integer GEMM with the scale applied."""
    directory = quantized("w8a8")
    OrtEngine(directory)  # writes the optimized decode step into the artifact's .ort cache
    (optimized,) = (directory / ".ort").glob("step_decode.*/model.onnx")
    ops = [node.op_type for node in onnx.load(str(optimized), load_external_data=False)
           .graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 2 * 3 + 1  # qkv, wo, w2 per layer; head
    assert ops.count("MatMulIntegerToFloat") == 2 * 2  # w1, w3
    assert ops.count("DynamicQuantizeLinear") == 2
    assert "MatMul" not in ops and "MatMulInteger" not in ops


def test_an_unknown_weight_format_is_one_sentence(tmp_path) -> None:
    with pytest.raises(UserError, match="--weights int3 is not a weight format"):
        build_artifact(model_for(), tmp_path / "x", model_name="GPT-tiny", image_size=24,
                       weights={}, capacity=37, build_options={}, weight_format="int3")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("weight_format", ["int8", "w8a8"])
def test_verify_checks_a_quantized_artifact_at_its_recorded_tolerances(
        tmp_path, weight_format: str) -> None:
    """build --weights W, then verify: against the fp32 model at W's tolerances, and greedy
    tokens that differ from fp32's are reported, not failed."""
    from click.testing import CliRunner

    from linear_export.cli import main

    out = tmp_path / weight_format
    built = CliRunner().invoke(main, ["build", "--model", "GPT-tiny", "--image-size", "24",
                                      "--random-weights", "--weights", weight_format,
                                      "--max-batch", "8", "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert load_artifact(out).weight_format == weight_format
    result = CliRunner().invoke(main, ["verify", str(out), "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert f"{weight_format} tolerances" in result.output and "result" in result.output
