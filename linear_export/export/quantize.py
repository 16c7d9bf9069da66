"""Low-precision weights for an artifact's graphs, in the forms ONNX Runtime runs fastest.

Every MatMul whose right side is a weight is rewritten; the KV cache, attention and the
small ops stay in the graph's dtype.
- `int8`, `int4`: weight-only `com.microsoft.MatMulNBits` (symmetric blocks of BLOCK_SIZE
  values per scale). `accuracy_level` 4 quantizes the activations to int8 inside the kernel.
- `w8a8`: ONNX Runtime's dynamic quantization: int8 weights with one scale per output
  channel, activations quantized to uint8 per tensor at run time (DynamicQuantizeLinear +
  MatMulInteger, which the session fuses into `com.microsoft.DynamicQuantizeMatMul`). MLAS
  runs it as u8s8 VNNI GEMMs: the fastest CPU form measured here (docs/speed.md). Weights
  take 7 bits (reduce_range): an artifact runs wherever it is copied, and on CPUs without
  VNNI (AVX2, AVX-512F) MLAS's u8s8 kernel adds pairs of u8 x s8 products in int16, which
  full 8-bit weights overflow (measured on an AVX2 EPYC: 39% of the largest logit off).
Graphs of standard ONNX ops (`--attention math`, what TensorRT parses) get int8/int4 in the
standard form instead: each weight as an int constant behind a `DequantizeLinear` into the
MatMul, symmetric blocks of BLOCK_SIZE along K (opset 21; int4 from ONNX Runtime's quantizer,
int8 written here, as that quantizer makes this form for 4 bits only). TensorRT builds
weight-only GEMMs from the pattern; ONNX Runtime's CPU session fuses it back into
MatMulNBits. w8a8's MatMulInteger has no TensorRT form.
The graphs of one artifact keep sharing one weight file: the main graph is written with a
fresh data file, the others point into it (matched by content).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHT_FORMATS = ("fp32", "int8", "int4", "w8a8")  # `build --weights`; fp32: the graph's dtype
QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "DequantizeLinear")  # as written
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 compute


def quantize_graphs(directory: Path, main: str, graphs: list[str], others: list[str],
                    weights: str, log: Callable[[str], None] = lambda line: None, *,
                    standard_ops: bool = False) -> None:
    """Rewrite `main` and `graphs` (files in `directory`) with `weights`-bit MatMul weights;
    `others` (graphs that share main's data file but hold no MatMul weights) are re-pointed
    at the new data file. `standard_ops`: the DequantizeLinear form (TensorRT's)."""
    directory = Path(directory)
    standard_ops = standard_ops and weights != "w8a8"  # MatMulInteger is standard ONNX already
    protos = {name: onnx.load(str(directory / name)) for name in [main, *graphs, *others]}
    for name in [main, *graphs]:
        form = "DequantizeLinear" if standard_ops else "ONNX Runtime's quantized MatMuls"
        log(f"quantizing {name}'s MatMul weights to {weights} ({form})")
        protos[name] = (_dequantize_linear(protos[name], weights) if standard_ops
                        else _quantized(protos[name], weights, directory))
    data = directory / f"{main}.data"
    data.unlink()
    onnx.save_model(protos[main], str(directory / main), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    from .onnx_step import share_external_data  # the exporter's module: imports torch

    scratch = Path(tempfile.mkdtemp(dir=directory, prefix=".quantized."))
    try:
        for name in [*graphs, *others]:
            onnx.save_model(protos[name], str(scratch / name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{name}.data",
                            size_threshold=1024)
            share_external_data(scratch / name, directory / main)
            os.replace(scratch / name, directory / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name in [main, *graphs, *others]:
        onnx.checker.check_model(str(directory / name))


def _quantized(proto: onnx.ModelProto, weights: str, directory: Path) -> onnx.ModelProto:
    """`proto` with its weight MatMuls in the `weights` form."""
    if weights == "w8a8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # It warns on the root logger about shape-inference preprocessing, which these graphs
        # do not need; quiet for the call only.
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(max(level, logging.ERROR))
        scratch = Path(tempfile.mkdtemp(dir=directory, prefix=".w8a8."))
        try:
            quantize_dynamic(proto, scratch / "model.onnx", op_types_to_quantize=["MatMul"],
                             per_channel=True, reduce_range=True,
                             weight_type=QuantType.QInt8, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
            return onnx.load(str(scratch / "model.onnx"))
        finally:
            root.setLevel(level)
            shutil.rmtree(scratch, ignore_errors=True)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # It logs a line per node it skips (thousands): say what is done here instead.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(proto, bits={"int8": 8, "int4": 4}[weights],
                                     block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    return quantizer.model.model


def _dequantize_linear(proto: onnx.ModelProto, weights: str) -> onnx.ModelProto:
    """`proto` with each weight MatMul reading DequantizeLinear(int weight, block scales)."""
    if weights == "int4":
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
            logging.ERROR)  # a line per skipped node, and a warning for the opset-21 bump
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True,
                                              quant_format=QuantFormat.QDQ, bits=4)
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
        quantizer.process()
        return quantizer.model.model
    # ONNX Runtime's quantizer writes this form for 4 bits only; int8 takes the same blocks.
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes, dequantized = [], {}
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            if weight.name not in dequantized:
                quantized, scale = int8_blocks(numpy_helper.to_array(weight))
                graph.initializer.extend([
                    numpy_helper.from_array(quantized, f"{weight.name}_DQ_Q8"),
                    numpy_helper.from_array(scale, f"{weight.name}_DQ_scales")])
                dequantized[weight.name] = f"{weight.name}_DQ_Q8_output"
                nodes.append(onnx.helper.make_node(
                    "DequantizeLinear", [f"{weight.name}_DQ_Q8", f"{weight.name}_DQ_scales"],
                    [dequantized[weight.name]], name=f"{weight.name}_DQ_Q8", axis=0,
                    block_size=BLOCK_SIZE))
            node.input[1] = dequantized[weight.name]
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    kept = [tensor for tensor in graph.initializer if tensor.name not in dequantized]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    for opset in proto.opset_import:  # blocked DequantizeLinear is opset 21
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    return proto


def int8_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of a [K, N] weight with one scale per BLOCK_SIZE rows of a column:
    ([K, N] int8, [ceil(K / BLOCK_SIZE), N] scales in the weight's dtype)."""
    rows = weight.shape[0]
    blocks = -(-rows // BLOCK_SIZE)
    padded = np.zeros((blocks * BLOCK_SIZE, weight.shape[1]), np.float32)
    padded[:rows] = weight.astype(np.float32)
    absmax = np.abs(padded.reshape(blocks, BLOCK_SIZE, -1)).max(axis=1)
    scale = np.where(absmax > 0, absmax / 127, 1).astype(weight.dtype)
    full = np.repeat(scale.astype(np.float32), BLOCK_SIZE, axis=0)[:rows]
    quantized = np.clip(np.rint(weight.astype(np.float32) / full), -127, 127).astype(np.int8)
    return quantized, scale


def count_quantized(path: Path) -> int:
    """Quantized MatMul nodes in the graph at `path` (what a quantized build must show)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type in QUANTIZED_OPS for node in graph.node)
