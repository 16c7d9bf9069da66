"""Low-precision artifacts (export/quantize.py): weight-only int8/int4 (MatMulNBits, or
DequantizeLinear -> MatMul in standard-op graphs, TensorRT's form) and w8a8 (dynamic int8
MatMulInteger) in every graph that has weights, one shared weight file, and steps close to the
fp32 model's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from artifact_fixtures import _ROOT, built, model_for
from test_onnx_export import step_inputs

from linear_export.engines.ort import OrtEngine
from linear_export.errors import UserError
from linear_export.export.artifact import SCORE, STEP_DECODE, build_artifact, load_artifact, rehash
from linear_export.export.consistency import MANIFEST, STEP, manifest_text
from linear_export.export.quantize import count_quantized, quantize_graphs


def quantized(weight_format: str, attention: str = "gqa"):
    """The tiny fp32 artifact (exported once per attention kernel), its graphs quantized as
    build_artifact's last step does (quantize_graphs), and the manifest's weights updated:
    an export per weight format would cost this module minutes, the quantizing a second."""
    out = _ROOT / f"GPT-tiny-{weight_format}-{attention}"
    if not out.exists():
        scratch = _ROOT / f".{out.name}"
        shutil.copytree(built(split_cache=True, attention=attention), scratch,
                        ignore=shutil.ignore_patterns(".ort"))  # its optimized fp32 graphs
        quantize_graphs(scratch, STEP, [STEP_DECODE], [SCORE], weight_format,
                        standard_ops=attention == "math")
        manifest = json.loads((scratch / MANIFEST).read_text())
        manifest["build"]["weights"] = weight_format
        (scratch / MANIFEST).write_text(manifest_text(manifest))
        rehash(scratch)
        scratch.rename(out)
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
    got, want = _decode_logits(directory, model_for())
    error = (got - want).abs().max().item()
    print(f"{weight_format}: {error / want.abs().max().item():.3f} of the largest logit")
    assert 0 < error < share * want.abs().max().item()  # changed, but not by much


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


@pytest.mark.parametrize(("weight_format", "attention"),
                         [("int8", "gqa"), ("w8a8", "gqa"), ("int4", "math")])
def test_verify_checks_a_quantized_artifact_at_its_recorded_tolerances(
        tmp_path, weight_format: str, attention: str) -> None:
    """build --weights W, then verify: against the fp32 model at W's tolerances, and greedy
    tokens that differ from fp32's are reported, not failed. int4 in TensorRT's form
    (--attention math) is held to the same tolerances as ONNX Runtime's."""
    from click.testing import CliRunner

    from linear_export.cli import main

    out = tmp_path / weight_format
    built = CliRunner().invoke(main, ["build", "--model", "GPT-tiny", "--image-size", "24",
                                      "--random-weights", "--weights", weight_format,
                                      "--attention", attention, "--max-batch", "8",
                                      "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert load_artifact(out).weight_format == weight_format
    result = CliRunner().invoke(main, ["verify", str(out), "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert f"{weight_format} tolerances" in result.output and "result" in result.output


def _decode_logits(directory, model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the artifact's decode logits, the fp32 model's) for one random decode step."""
    engine = OrtEngine(directory)
    torch.manual_seed(seed)  # the same inputs whatever ran before in this process
    ids, positions, cache = step_inputs(model, 3, 1, 9, torch.float32, engine.capacity)
    with torch.no_grad():
        want = model.decode(ids, positions, cache.key.clone(), cache.value.clone(),
                            cache.cache_len_tensor())[0]
    return engine.step(ids, positions, cache).logits.clone(), want


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_standard_op_graphs_carry_weights_as_blockwise_dequantize_linear(
        weight_format: str) -> None:
    """--attention math (TensorRT's graphs): every weight MatMul reads DequantizeLinear of an
    int constant, symmetric blocks of 32 along K, each value rounded to its step of the fp32
    weight; no float weight is left and no ONNX Runtime op is written."""
    directory = quantized(weight_format, "math")
    bits = {"int8": 8, "int4": 4}[weight_format]
    # The model's Linear weights, as the graph's MatMuls read them ([K, N]).
    linears = [module.weight.detach().T.numpy() for module in model_for().modules()
               if isinstance(module, torch.nn.Linear)]
    for name in ("step.onnx", "step_decode.onnx"):
        graph = onnx.load(str(directory / name))
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 21
        assert not [n for n in graph.graph.node if n.domain == "com.microsoft"]
        initializers = {t.name: t for t in graph.graph.initializer}
        dequantize = {n.output[0]: n for n in graph.graph.node if n.op_type == "DequantizeLinear"}
        weighted = [n for n in graph.graph.node if n.op_type == "MatMul"
                    and (n.input[1] in initializers or n.input[1] in dequantize)]
        assert len(weighted) == len(linears) == 2 * 5 + 1
        assert count_quantized(directory / name) == 2 * 5 + 1
        matched = set()
        for node in weighted:
            dq = dequantize[node.input[1]]  # never a float initializer
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            assert attributes == {"axis": 0, "block_size": 32}
            values = onnx.numpy_helper.to_array(initializers[dq.input[0]]).astype(np.float32)
            assert values.min() >= -(2 ** (bits - 1)) and values.max() < 2 ** (bits - 1)
            scale = onnx.numpy_helper.to_array(initializers[dq.input[1]])
            assert scale.shape == (-(-values.shape[0] // 32), values.shape[1])
            step = np.repeat(scale, 32, axis=0)[:values.shape[0]]  # int4's are negative
            # Round to nearest: half a step; int4's grid is -8..7 with the block's largest
            # magnitude at -8, so the other sign's extreme clips at 7: one step.
            bound = np.abs(step) * (0.5 if bits == 8 else 1.0) + 1e-6
            close = [i for i, weight in enumerate(linears) if weight.shape == values.shape
                     and np.all(np.abs(values * step - weight) <= bound)]
            assert len(close) == 1  # the one weight it stands for
            matched.add(close[0])
        assert len(matched) == len(linears)
    assert sorted(path.name for path in directory.glob("*.data")) == ["step.onnx.data"]


@pytest.mark.parametrize(("weight_format", "share"), [("int8", 0.1), ("int4", 0.6)])
def test_onnx_runtime_runs_the_standard_form_as_its_own_matmul_nbits(
        weight_format: str, share: float) -> None:
    """The CPU session fuses DequantizeLinear -> MatMul back into MatMulNBits (checked in its
    optimized model): the same op and speed as the ONNX Runtime form, and int4's logits equal
    that form's (the same quantizer), within the attention kernels' rounding."""
    directory = quantized(weight_format, "math")
    model = model_for()
    got, want = _decode_logits(directory, model)
    (optimized,) = (directory / ".ort").glob("step_decode.*/model.onnx")
    ops = [n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 2 * 5 + 1 and "DequantizeLinear" not in ops
    error = (got - want).abs().max().item()
    assert 0 < error < share * want.abs().max().item()
    if weight_format == "int4":
        ort_form, _ = _decode_logits(quantized("int4"), model)
        assert (got - ort_form).abs().max().item() < 1e-3 * want.abs().max().item()


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dequantize_linear_form_of_one_matmul(weight_format: str, dtype) -> None:
    """One MatMul, K = 40 (a partial last block): the scales keep the graph's dtype (fp16
    graphs are TensorRT's usual input), and ONNX Runtime, running the fp32 graph as written,
    computes x @ (int weight * scale) as computed here."""
    from linear_export.export.quantize import _dequantize_linear

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(40, 24)).astype(dtype)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "one",
        [onnx.helper.make_tensor_value_info("x", onnx.helper.np_dtype_to_tensor_dtype(
            np.dtype(dtype)), [3, 40])],
        [onnx.helper.make_tensor_value_info("y", onnx.helper.np_dtype_to_tensor_dtype(
            np.dtype(dtype)), [3, 24])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = _dequantize_linear(onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10),
        weight_format)
    onnx.checker.check_model(model, full_check=True)
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "w" not in tensors
    values, scale = tensors[dq.input[0]].astype(np.float32), tensors[dq.input[1]]
    assert scale.dtype == dtype and scale.shape == (2, 24)
    dequantized = values * np.repeat(scale.astype(np.float32), 32, axis=0)[:40]
    step = np.abs(scale.astype(np.float32)).max()
    assert 0 < np.abs(dequantized - weight.astype(np.float32)).max() <= step
    if dtype == np.float32:
        import onnxruntime

        x = rng.normal(size=(3, 40)).astype(np.float32)
        options = onnxruntime.SessionOptions()  # the graph as written, not fused to int8 compute
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dequantized,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("weight_format", "expected"),
                         [("w8a8", "MatMulInteger"), ("int8", "DequantizeLinear")])
def test_standard_op_graphs_keep_w8a8_as_dynamic_quantization(
        tmp_path, weight_format: str, expected: str) -> None:
    """--attention math --weights w8a8: MatMulInteger is standard ONNX already, so w8a8 keeps
    ONNX Runtime's dynamic quantization there; only int8/int4 take the DequantizeLinear form
    (sending w8a8 down that path would write int8 weight-only weights under a w8a8 label)."""
    weight = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "one",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 24])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)],
                                   ir_version=10)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    quantize_graphs(tmp_path, "m.onnx", [], [], weight_format, standard_ops=True)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert expected in ops
    assert ("DequantizeLinear" in ops) == (weight_format == "int8")
    assert count_quantized(tmp_path / "m.onnx") == 1
