"""Per-layer cache inputs: `past_key.{i}` [B, Hkv, C, D] instead of one `past_key` [L, ...].

Why: the exported graph picks layer i of the stacked cache with Gather, and ONNX Runtime's
Gather copies, so every step copies the whole cache once (GPT-B, 16 rows, 257 slots: 300 MB).
With one input per layer the host binds each layer's slice of the same torch tensor in place
(`cache.key[i]` is contiguous: the layer is the outermost axis), and nothing is copied.
The runtime side of the contract (a KVCache [L, B, Hkv, C, D]) does not change.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper

CACHE_INPUTS = ("past_key", "past_value")


def layer_input(name: str, layer: int) -> str:
    return f"{name}.{layer}"


def split_cache_inputs(path: Path, n_layer: int) -> None:
    """Rewrite the graph at `path` in place (its external data file is left as it is)."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    constants = _scalar_constants(graph)
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        cache = [name for name in node.input if name in CACHE_INPUTS]
        if not cache:
            kept.append(node)
            continue
        if node.op_type == "Gather" and node.input[0] in CACHE_INPUTS \
                and _attribute(node, "axis", 0) == 0 and node.input[1] in constants:
            renamed[node.output[0]] = layer_input(node.input[0], constants[node.input[1]])
            continue  # the Gather (a copy) disappears: its consumers read the input directly
        if node.op_type == "Shape" and _shift_shape(node):
            kept.append(node)
            continue
        raise RuntimeError(f"{path.name}: cannot split the cache inputs, {node.op_type} node "
                           f"'{node.name}' reads {cache[0]} as a whole")
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = renamed.get(name, name)
    for output in graph.output:
        if output.name in renamed:
            raise RuntimeError(f"{path.name}: a cache layer is a graph output")
    del graph.node[:]
    graph.node.extend(kept)

    originals = {value.name: value for value in graph.input}
    inputs = []
    for value in originals.values():
        if value.name not in CACHE_INPUTS:
            inputs.append(value)
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim][1:]
        inputs.extend(onnx.helper.make_tensor_value_info(layer_input(value.name, layer),
                                                         tensor.elem_type, dims)
                      for layer in range(n_layer))
    del graph.input[:]
    graph.input.extend(inputs)
    _drop_unused_initializers(graph)
    onnx.save_model(proto, str(path))


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, int]:
    """Integer scalars held inline (initializers or Constant nodes): the layer indices."""
    found = {}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.dims:
            found[tensor.name] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant":
            value = _attribute(node, "value", None)
            if value is not None and not value.dims:
                found[node.output[0]] = numpy_helper.to_array(value)
    return {name: int(value) for name, value in found.items() if value.dtype.kind in "iu"}


def _shift_shape(node: onnx.NodeProto) -> bool:
    """Point Shape(past_*)[start:end] at layer 0, one axis fewer, if it skips the layer axis."""
    start, end = _attribute(node, "start", 0), _attribute(node, "end", None)
    if start == 0 or (end is not None and end == 0):
        return False  # it asks for the layer axis itself
    for attribute in node.attribute:
        if attribute.name in ("start", "end") and attribute.i > 0:
            attribute.i -= 1  # negative (end-relative) bounds keep their meaning
    node.input[0] = layer_input(node.input[0], 0)
    return True


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {value.name for value in graph.output}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
