"""Low-precision weights for an artifact's graphs, in the forms ONNX Runtime runs fastest.

Every MatMul whose right side is a weight is rewritten; the KV cache, attention and the
small ops stay in the graph's dtype.
- `int8`, `int4`: weight-only `com.microsoft.MatMulNBits` (symmetric blocks of BLOCK_SIZE
  values per scale). `accuracy_level` 4 quantizes the activations to int8 inside the kernel.
- `w8a8`: ONNX Runtime's dynamic quantization: int8 weights with one scale per output
  channel, activations quantized to uint8 per tensor at run time (DynamicQuantizeLinear +
  MatMulInteger, which the session fuses into `com.microsoft.DynamicQuantizeMatMul`). MLAS
  runs it as u8s8 VNNI GEMMs: the fastest CPU form measured here (docs/speed.md). Weights
  keep all 8 bits (no reduce_range), which suits CPUs with VNNI; on AVX2-only CPUs the u8s8
  product can saturate.
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

import onnx

WEIGHT_FORMATS = ("fp32", "int8", "int4", "w8a8")  # `build --weights`; fp32: the graph's dtype
QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger")  # as written; sessions fuse MatMulInteger
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 compute


def quantize_graphs(directory: Path, main: str, graphs: list[str], others: list[str],
                    weights: str, log: Callable[[str], None] = lambda line: None) -> None:
    """Rewrite `main` and `graphs` (files in `directory`) with `weights`-bit MatMul weights;
    `others` (graphs that share main's data file but hold no MatMul weights) are re-pointed
    at the new data file."""
    directory = Path(directory)
    protos = {name: onnx.load(str(directory / name)) for name in [main, *graphs, *others]}
    for name in [main, *graphs]:
        log(f"quantizing {name}'s MatMul weights to {weights}")
        protos[name] = _quantized(protos[name], weights, directory)
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
                             per_channel=True, reduce_range=False,
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


def count_quantized(path: Path) -> int:
    """Quantized MatMul nodes in the graph at `path` (what a quantized build must show)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type in QUANTIZED_OPS for node in graph.node)
