"""The exported step graph: contract IO (symbolic B and T), checker, no cache copy, ORT == torch."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from artifact_fixtures import built, model_for, one_torch_thread  # noqa: F401

from linear_export.engines.cache import CacheShape, KVCache
from linear_export.engines.ort import OrtEngine
from linear_export.export.artifact import load_artifact
from linear_export.export.onnx_step import (
    DECODE_OUTPUTS,
    INPUT_NAMES,
    OUTPUT_NAMES,
    SCORE_INPUTS,
    TensorSpec,
    _check_no_cache_sized_values,
    _match,
)
from linear_export.export.split_cache import split_cache_inputs
from linear_export.runtime.verify import TOLERANCES

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"name": "GPT-tiny"}  # one artifact shared by most tests
# LineAR's capacity for 2 of 6 lines (1 + 12 + 6), with one cache input per layer.
PER_LAYER = {"name": "GPT-tiny", "capacity": 19, "split_cache": True}
ARTIFACTS = {"GPT-tiny": TINY, "GPT-tiny-gqa": {"name": "GPT-tiny-gqa"},
             "GPT-tiny per-layer": PER_LAYER}


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_io_is_the_contract_with_symbolic_batch_and_steps() -> None:
    graph = onnx.load(str(built(**TINY) / "step.onnx"), load_external_data=False).graph
    inputs = {value.name: dims(value) for value in graph.input}
    outputs = {value.name: dims(value) for value in graph.output}
    assert list(inputs) == list(INPUT_NAMES) and list(outputs) == list(OUTPUT_NAMES)
    batch, steps = inputs["input_ids"]
    assert isinstance(batch, str) and isinstance(steps, str) and batch != steps
    assert inputs["position_ids"] == [batch, steps]
    assert inputs["past_key"] == [2, batch, 4, 37, 16] == inputs["past_value"]
    assert inputs["cache_len"] == []
    assert outputs["logits"] == [batch, 64]
    assert outputs["present_key"] == [2, batch, 4, steps, 16] == outputs["present_value"]
    assert outputs["attn_mass"] == [2, batch, 4, 37]
    opset = {entry.domain: entry.version for entry in
             onnx.load(str(built(**TINY) / "step.onnx"), load_external_data=False).opset_import}
    assert opset[""] == 18


def test_checker_passes_and_the_decode_and_score_graphs_share_the_weights() -> None:
    directory = built(**TINY)
    for name in ("step.onnx", "step_decode.onnx", "score.onnx"):
        onnx.checker.check_model(str(directory / name))  # path form: external data checked
        graph = onnx.load(str(directory / name), load_external_data=False).graph
        locations = {entry.value for tensor in graph.initializer
                     for entry in tensor.external_data if entry.key == "location"}
        assert locations <= {"step.onnx.data"}
    assert sorted(p.name for p in directory.glob("*.data")) == ["step.onnx.data"]
    graph = onnx.load(str(directory / "step_decode.onnx"), load_external_data=False).graph
    assert [value.name for value in graph.output] == list(DECODE_OUTPUTS)  # stacked: no GQA
    graph = onnx.load(str(directory / "score.onnx"), load_external_data=False).graph
    assert [value.name for value in graph.input] == list(SCORE_INPUTS)
    assert [dims(value) for value in graph.output] == [[2, dims(graph.input[0])[1], 4, 37]]


def test_the_fused_decode_step_runs_onnx_runtimes_fused_ops_per_layer() -> None:
    directory = built(**PER_LAYER)
    graph = onnx.load(str(directory / "step_decode.onnx"), load_external_data=False).graph
    fused = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert len(fused) == 2 and {node.domain for node in fused} == {"com.microsoft"}
    ops = Counter(node.op_type for node in graph.node)
    assert not {"Softmax"} & set(ops)  # no unfused attention
    # RoPE on q and k, and each residual add with the norm after it, one op each per layer;
    # only the first layer's attention_norm (no add before it) stays standard ops.
    assert ops["RotaryEmbedding"] == 4 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert ops["ReduceMean"] == 1
    standard = onnx.load(str(built(**TINY) / "step_decode.onnx"), load_external_data=False)
    assert {node.domain for node in standard.graph.node} == {""}  # math: TensorRT's ops only
    assert [value.name for value in graph.output] == [
        *DECODE_OUTPUTS, "key_cache.0", "key_cache.1", "value_cache.0", "value_cache.1"]
    assert [node.input[3] for node in fused] == ["past_key.0", "past_key.1"]  # read in place
    assert load_artifact(directory).attention == "gqa"
    assert load_artifact(built(**TINY)).attention == "math"  # stacked inputs cannot alias


def test_no_value_in_the_graph_has_the_whole_cache_shape() -> None:
    proto = onnx.load(str(built(**TINY) / "step.onnx"), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto)
    inputs = {value.name for value in proto.graph.input}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        shape = dims(value)
        assert value.name in inputs or not (len(shape) == 5 and shape[3] == 37), value.name


def test_the_checks_fail_loudly() -> None:
    want = [TensorSpec("input_ids", "int64", ("batch", "steps"))]
    _match([TensorSpec("input_ids", "int64", ("b", "t"))], want, "ok.onnx")
    with pytest.raises(RuntimeError, match="symbolic"):  # T specialised to 1
        _match([TensorSpec("input_ids", "int64", ("b", 1))], want, "bad.onnx")
    cache = onnx.helper.make_tensor_value_info("past_key", onnx.TensorProto.FLOAT,
                                               [2, "batch", 4, 37, 16])
    copy = onnx.helper.make_tensor_value_info("copy", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["past_key"], ["copy"])],
                                   "g", [cache], [copy])
    with pytest.raises(RuntimeError, match="whole cache"):
        _check_no_cache_sized_values(onnx.helper.make_model(graph), 2, 37, "bad.onnx")


def step_inputs(model, batch: int, steps: int, cache_len: int, dtype: torch.dtype,
                engine_capacity: int = 37):
    """Random ids (a class token in row 0), positions after the cache, garbage in every slot."""
    config, capacity = model.config, engine_capacity
    cache = KVCache(CacheShape(config.n_layer, batch, config.kv_heads, capacity,
                               config.head_dim), dtype)
    cache.key.copy_(torch.randn_like(cache.key, dtype=torch.float32))
    cache.value.copy_(torch.randn_like(cache.value, dtype=torch.float32))
    cache.cache_len = cache_len
    ids = torch.randint(0, config.vocab_size, (batch, steps))
    ids[0, 0] = config.vocab_size + 3  # class token 3
    positions = torch.arange(cache_len, cache_len + steps).expand(batch, -1)
    return ids, positions, cache


def assert_close(engine: OrtEngine, model, batch: int, steps: int, cache_len: int,
                 tolerances: dict[str, tuple[float, float]]) -> None:
    ids, positions, cache = step_inputs(model, batch, steps, cache_len, engine.dtype,
                                        engine.capacity)
    out = engine.step(ids, positions, cache, need_scores=True)
    got = {name: getattr(out, name).clone() for name in OUTPUT_NAMES}
    with torch.no_grad():
        want = model.step(ids, positions, cache.key, cache.value, cache.cache_len_tensor())
    for (name, value), expected in zip(got.items(), want, strict=True):
        atol, rtol = tolerances[name]
        assert value.shape == expected.shape, name
        torch.testing.assert_close(value.float(), expected.float(), atol=atol, rtol=rtol,
                                   msg=lambda text, name=name: f"{name}: {text}")
    # Dead slots hold garbage that must not matter: new garbage, identical outputs.
    cache.key[:, :, :, cache_len:].normal_()
    cache.value[:, :, :, cache_len:].normal_()
    again = engine.step(ids, positions, cache, need_scores=True)
    for name in OUTPUT_NAMES:
        assert torch.equal(getattr(again, name), got[name]), name


@pytest.mark.parametrize("name", list(ARTIFACTS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("steps", "cache_len"), [(1, 0), (1, 20), (4, 0), (5, 11), (2, 35)])
def test_ort_matches_pytorch_step_fp32(name: str, batch: int, steps: int, cache_len: int) -> None:
    engine = OrtEngine(built(**ARTIFACTS[name]))
    model = model_for(ARTIFACTS[name]["name"])
    if cache_len + steps > engine.capacity:
        cache_len = engine.capacity - steps
    # Exact fp32 agreement well inside the DESIGN's 1e-4.
    tolerances = dict.fromkeys(OUTPUT_NAMES, (1e-4, 0.0))
    assert_close(engine, model, batch, steps, cache_len, tolerances)


def test_ort_matches_pytorch_step_fp16() -> None:
    engine = OrtEngine(built("GPT-tiny-gqa", torch.float16))
    model = model_for("GPT-tiny-gqa", torch.float16)
    assert engine.dtype == torch.float16 and model.rope.dtype == torch.float32
    for batch, steps, cache_len in [(1, 1, 0), (3, 1, 20), (3, 4, 7)]:
        assert_close(engine, model, batch, steps, cache_len, TOLERANCES["fp16"])


@pytest.mark.parametrize("name", list(ARTIFACTS))
@pytest.mark.parametrize(("batch", "steps", "cache_len"),
                         [(1, 1, 0), (3, 1, 9), (3, 1, 18), (2, 4, 0)])
def test_decode_step_matches_pytorch(name: str, batch: int, steps: int, cache_len: int) -> None:
    """The decode step (fused where the artifact has it) against model.decode, fp32 1e-4;
    the fused kernel writes exactly the step's keys and values at cache_len, nothing else."""
    engine = OrtEngine(built(**ARTIFACTS[name]))
    model = model_for(ARTIFACTS[name]["name"])
    cache_len = min(cache_len, engine.capacity - steps)
    ids, positions, cache = step_inputs(model, batch, steps, cache_len, torch.float32,
                                        engine.capacity)
    before = cache.key.clone(), cache.value.clone()
    with torch.no_grad():
        want = model.decode(ids, positions, before[0], before[1], cache.cache_len_tensor())
    out = engine.step(ids, positions, cache)
    assert out.attn_mass is None
    for got, expected, label in zip((out.logits, out.present_key, out.present_value,
                                     out.present_query), want[:4], DECODE_OUTPUTS, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=label)
    end = cache_len + steps
    for tensor, old, present in zip((cache.key, cache.value), before,
                                    (out.present_key, out.present_value), strict=True):
        assert torch.equal(tensor[:, :, :, :cache_len], old[:, :, :, :cache_len])
        assert torch.equal(tensor[:, :, :, end:], old[:, :, :, end:])
        if engine.in_place:
            torch.testing.assert_close(tensor[:, :, :, cache_len:end], present)


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_score_graph_matches_pytorch(name: str) -> None:
    engine = OrtEngine(built(**ARTIFACTS[name]))
    model = model_for(ARTIFACTS[name]["name"])
    config = model.config
    _, _, cache = step_inputs(model, 3, 1, 15, torch.float32, engine.capacity)
    queries = torch.randn(config.n_layer, 3, config.n_head, 6, config.head_dim)
    shifts = torch.tensor([6, 12, 18])
    got = engine.score_line(queries, shifts, cache)
    with torch.no_grad():
        want = model.line_scores(queries, shifts, cache.key, cache.cache_len_tensor())
    assert want[..., :15].sum() > 0 and not want[..., 15:].any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_per_layer_cache_inputs_are_bound_without_a_gather() -> None:
    graph = onnx.load(str(built(**PER_LAYER) / "step.onnx"), load_external_data=False).graph
    inputs = {value.name: dims(value) for value in graph.input}
    batch = inputs["input_ids"][0]
    assert list(inputs) == ["input_ids", "position_ids", "past_key.0", "past_key.1",
                            "past_value.0", "past_value.1", "cache_len", "score_position_ids"]
    assert inputs["past_key.1"] == [batch, 4, 19, 16] == inputs["past_value.0"]
    readers = {node.op_type for node in graph.node
               if any(name.startswith("past_") for name in node.input)}
    assert readers and not readers & {"Gather", "Split", "Slice"}, readers  # no per-step copy
    assert load_artifact(built(**PER_LAYER)).split_cache


def test_splitting_refuses_a_graph_that_reads_the_whole_cache(tmp_path) -> None:
    cache = onnx.helper.make_tensor_value_info("past_key", onnx.TensorProto.FLOAT,
                                               [2, "batch", 4, 19, 16])
    out = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("ReduceSum", ["past_key"], ["out"])],
                                   "g", [cache], [out])
    onnx.save_model(onnx.helper.make_model(graph), str(tmp_path / "g.onnx"))
    with pytest.raises(RuntimeError, match="ReduceSum"):
        split_cache_inputs(tmp_path / "g.onnx", 2)
