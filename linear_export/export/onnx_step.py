"""Export the decode step (DESIGN.md contract) to ONNX with the dynamo exporter, and check it."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from ..models.attention import MAX_LOOKAHEAD
from ..models.gpt import (
    GPT,
    DecodeModule,
    StepModule,
)
from ..models.kernels import exporting_kernels
from .split_cache import CACHE_INPUTS, layer_input, split_cache_inputs

INPUT_NAMES = ("input_ids", "position_ids", "past_key", "past_value", "cache_len",
               "score_position_ids")
OUTPUT_NAMES = ("logits", "present_key", "present_value", "attn_mass")
# The decode step's: no attn_mass, the step's post-RoPE queries instead (for the score graph).
DECODE_OUTPUTS = ("logits", "present_key", "present_value", "present_query")
# The fused kernel's in-place caches, per layer [B, Hkv, C, D]: bound to the cache itself.
IN_PLACE = ("key_cache", "value_cache")
SCORE_INPUTS = ("line_query", "score_shifts", "past_key", "cache_len")
SCORE_OUTPUT = "line_mass"  # [L, B, Hkv, C] float32
QUERIES = "queries"  # line_query [L, B, H, Q, D]: the line's last Q queries
# [L, B, Hkv, C] int64: each slot's sequence position, -1 for a dead one (per-head budgets)
SLOT_POSITIONS = "slot_positions"
DEFAULT_OPSET = 18
BATCH, STEPS = "batch", "steps"  # the symbolic dims' names in the graph
ROTATIONS = "rotations"  # score_position_ids [B, R, T]: R scoring rotations of each query
ALIGN = 4096  # offsets of appended external tensors, so they stay mmap-friendly


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int64
    shape: tuple[int | str, ...]  # ints are static, strings symbolic

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def input_names(with_scores: bool, head_shared: bool = False) -> tuple[str, ...]:
    """Only the scored variant takes score_position_ids (where attn_mass's queries sit); a
    step for per-head budgets takes slot_positions after cache_len."""
    names = INPUT_NAMES if with_scores else INPUT_NAMES[:-1]
    if head_shared:
        names = (*names[:5], SLOT_POSITIONS, *names[5:])
    return names


def output_names(with_scores: bool, n_in_place: int = 0) -> tuple[str, ...]:
    """The scored step's outputs, or the decode step's (+ the fused kernel's per layer)."""
    if with_scores:
        return OUTPUT_NAMES
    return DECODE_OUTPUTS + tuple(f"{name}.{layer}" for name in IN_PLACE
                                  for layer in range(n_in_place))


def example_inputs(model: GPT, capacity: int, with_scores: bool = True,
                   head_shared: bool = False) -> tuple[torch.Tensor, ...]:
    """B = T = 2 and R = 3: the dynamo exporter specialises any dimension whose example size
    is 1, and would tie two dimensions whose examples are equal."""
    config, batch, steps = model.config, 2, 2
    dtype = model.dtype
    cache = (config.n_layer, batch, config.kv_heads, capacity, config.head_dim)
    prefix = model.layout.prefix
    positions = torch.arange(prefix, prefix + steps).expand(batch, -1).clone()
    inputs = (
        torch.zeros(batch, steps, dtype=torch.long),
        positions,
        torch.zeros(cache, dtype=dtype),
        torch.zeros(cache, dtype=dtype),
        torch.tensor(1, dtype=torch.long),
        torch.stack([positions + model.layout.width * lines for lines in (1, 2, 3)], dim=1),
    )
    if head_shared:
        inputs = (*inputs[:5], torch.zeros(cache[:4], dtype=torch.long), inputs[5])
    return inputs if with_scores else inputs[:-1]


def _dynamic_shapes(max_batch: int, capacity: int, with_scores: bool,
                    head_shared: bool) -> dict:
    """The exported inputs' dynamic axes: rows, steps and (scored step) rotations."""
    batch = torch.export.Dim(BATCH, min=1, max=max(2, max_batch))
    steps = torch.export.Dim(STEPS, min=1, max=capacity)
    shapes = {"input_ids": {0: batch, 1: steps}, "position_ids": {0: batch, 1: steps},
              "past_key": {1: batch}, "past_value": {1: batch}, "cache_len": None}
    if head_shared:  # otherwise StepModule's slot_positions stays None: no such graph input
        shapes[SLOT_POSITIONS] = {1: batch}
    if with_scores:
        rotations = torch.export.Dim(ROTATIONS, min=1, max=MAX_LOOKAHEAD)
        shapes["score_position_ids"] = {0: batch, 1: rotations, 2: steps}
    return shapes


def export_step(
    model: GPT,
    path: Path,
    *,
    capacity: int,
    with_scores: bool = True,
    max_batch: int = 64,
    opset: int = DEFAULT_OPSET,
    split_cache: bool = False,
    head_shared: bool = False,
    attention: str = "math",
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Write `path` (+ `path.data`, all weights) and return its checked input/output specs.

    `with_scores`: the scored step (attn_mass); without, the decode step (present_query).
    `split_cache`: per-layer cache inputs (see split_cache.py) instead of the stacked ones.
    `head_shared`: the step for per-head budgets, which also takes `slot_positions`.
    `attention`: the decode step's kernel (decode_kernel() says which one a build gets).
    """
    if capacity < 2:
        raise ValueError(f"capacity {capacity} is too small to export (need at least 2 slots)")
    model = model.eval()
    dynamic_shapes = _dynamic_shapes(max_batch, capacity, with_scores, head_shared)
    example = example_inputs(model, capacity, with_scores, head_shared)
    keywords = {}
    if with_scores:  # by name, so a plain cache's step can leave slot_positions out
        *example, keywords["score_position_ids"] = example
    module = StepModule(model, with_scores=True) if with_scores else DecodeModule(model)
    in_place = model.config.n_layer if not with_scores and attention == "gqa" else 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), exporting_kernels(attention):
        # The exporter warns about every renamed axis and deprecated pytree internals: noise.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module.eval(),
            tuple(example),
            str(path),
            kwargs=keywords,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names(with_scores, head_shared)),
            output_names=list(output_names(with_scores, in_place)),
            dynamic_shapes=dynamic_shapes,
            external_data=True,
            verbose=False,
        )
    if split_cache:
        split_cache_inputs(path, model.config.n_layer)
    onnx.checker.check_model(str(path))  # the path form, so external data is checked too
    return check_step_graph(path, model, capacity, with_scores, split_cache, head_shared,
                            in_place)


def decode_kernel(requested: str, split_cache: bool) -> str:
    """The decode step's attention kernel: the fused one needs each layer's cache as its own
    input (to update it in place); otherwise the standard ops."""
    return requested if split_cache else "math"


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    shape = tuple(dim.dim_param or dim.dim_value for dim in tensor.shape.dim)
    return TensorSpec(value.name, dtype, shape)


def check_step_graph(
    path: Path, model: GPT, capacity: int, with_scores: bool, split_cache: bool = False,
    head_shared: bool = False, in_place: int = 0,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Fail loudly unless the IO is the contract's, symbolic in B and T, with no cache copy."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    inputs = [_spec(value) for value in proto.graph.input]
    outputs = [_spec(value) for value in proto.graph.output]
    config = model.config
    float_name = str(model.dtype).removeprefix("torch.")
    layers, heads, kv_heads, dim = config.n_layer, config.n_head, config.kv_heads, config.head_dim
    cache = (layers, BATCH, kv_heads, capacity, dim)
    present = (layers, BATCH, kv_heads, STEPS, dim)
    if split_cache:
        caches = [TensorSpec(layer_input(name, layer), float_name, cache[1:])
                  for name in CACHE_INPUTS for layer in range(layers)]
    else:
        caches = [TensorSpec(name, float_name, cache) for name in CACHE_INPUTS]
    expected = [
        TensorSpec("input_ids", "int64", (BATCH, STEPS)),
        TensorSpec("position_ids", "int64", (BATCH, STEPS)),
        *caches,
        TensorSpec("cache_len", "int64", ()),
        *([TensorSpec(SLOT_POSITIONS, "int64", cache[:4])] if head_shared else []),
        *([TensorSpec("score_position_ids", "int64", (BATCH, ROTATIONS, STEPS))]
          if with_scores else []),
        TensorSpec("logits", "float32", (BATCH, config.vocab_size)),
        TensorSpec("present_key", float_name, present),
        TensorSpec("present_value", float_name, present),
    ]
    if with_scores:
        expected.append(TensorSpec("attn_mass", "float32", (layers, BATCH, heads, capacity)))
    else:
        expected.append(TensorSpec("present_query", float_name,
                                   (layers, BATCH, heads, STEPS, dim)))
        expected += [TensorSpec(name, float_name, cache[1:])
                     for name in output_names(False, in_place)[len(DECODE_OUTPUTS):]]
    _match(inputs + outputs, expected, path.name)
    _check_no_cache_sized_values(proto, layers, capacity, path.name)
    return inputs, outputs


def _match(got: list[TensorSpec], want: list[TensorSpec], name: str) -> None:
    """Static dims must be equal; B and T must each be one symbol, used consistently."""
    symbols: dict[str, str] = {}
    problem = [g.name for g in got] != [w.name for w in want]
    for g, w in zip(got, want, strict=False):
        problem |= g.dtype != w.dtype or len(g.shape) != len(w.shape)
        for have, expect in zip(g.shape, w.shape, strict=False):
            if isinstance(expect, int):
                problem |= have != expect
            elif not isinstance(have, str) or not have:
                problem = True  # a specialised (static) B or T: the pitfall in DESIGN.md
            else:
                problem |= symbols.setdefault(expect, have) != have
    problem |= len(set(symbols.values())) != len(symbols)
    if problem:
        raise RuntimeError(
            f"{name}: exported IO {[s.to_json() for s in got]} does not match the step contract "
            f"{[s.to_json() for s in want]} (B and T must stay symbolic)"
        )


def _check_no_cache_sized_values(
    proto: onnx.ModelProto, layers: int, capacity: int, name: str
) -> None:
    """Only the inputs may have the whole cache's shape: outputs carry this step's K/V only."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    inputs = {value.name for value in proto.graph.input}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        whole = len(dims) == 5 and dims[0] == layers and dims[3] == capacity
        if whole and value.name not in inputs:
            raise RuntimeError(f"{name}: value '{value.name}' {dims} has the whole cache's shape; "
                               "the step must output only its own keys and values")


def share_external_data(source: Path, target: Path) -> None:
    """Point `source`'s external tensors into `target`'s data file, appending only new tensors.

    A tensor with the same bytes as one of `target`'s reuses its offset (matched by content:
    the exporter names constant-folded weights differently in each export), so a second variant
    of the step costs a graph file, not a second copy of the weights. `source` is rewritten to
    refer to `target.name + '.data'` and its own data file is deleted.
    """
    target_data = target.with_name(target.name + ".data")
    known: dict[tuple[int, bytes], int] = {}
    for tensor in onnx.load(str(target), load_external_data=False).graph.initializer:
        info = _external(tensor)
        if info is not None:
            _, offset, length = info
            known[length, _digest(_read(target_data, offset, length))] = offset
    proto = onnx.load(str(source), load_external_data=False)
    old_locations = set()
    with open(target_data, "r+b") as data_file:
        for tensor in proto.graph.initializer:
            info = _external(tensor)
            if info is None:
                continue
            location, offset, length = info
            old_locations.add(location)
            payload = _read(source.parent / location, offset, length)
            key = (length, _digest(payload))
            if key not in known:
                data_file.seek(0, os.SEEK_END)
                end = data_file.tell()
                known[key] = (end + ALIGN - 1) // ALIGN * ALIGN
                data_file.write(b"\0" * (known[key] - end) + payload)
            _set_external(tensor, target_data.name, known[key], length)
    onnx.save_model(proto, str(source))
    for location in old_locations - {target_data.name}:
        (source.parent / location).unlink(missing_ok=True)


def _external(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entries = {entry.key: entry.value for entry in tensor.external_data}
    return entries["location"], int(entries.get("offset", 0)), int(entries["length"])


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
