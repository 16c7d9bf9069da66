"""Weight-only low precision for an artifact's graphs: ONNX Runtime's MatMulNBits.

Every MatMul whose right side is a weight becomes `com.microsoft.MatMulNBits` with int8 or
int4 blocks (symmetric, BLOCK_SIZE values per scale); activations and the KV cache stay in
the graph's dtype. `accuracy_level` 4 computes with int8 activations (AVX512-VNNI/AMX on
CPUs that have them). The graphs of one artifact keep sharing one weight file: the main
graph is written with a fresh data file, the others point into it (matched by content).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

WEIGHT_FORMATS = ("fp32", "int8", "int4")  # `build --weights`; fp32: the graph's own dtype
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 compute


def quantize_graphs(directory: Path, main: str, graphs: list[str], others: list[str],
                    weights: str, log: Callable[[str], None] = lambda line: None) -> None:
    """Rewrite `main` and `graphs` (files in `directory`) with `weights`-bit MatMul weights;
    `others` (graphs that share main's data file but hold no MatMul weights) are re-pointed
    at the new data file."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # It logs a line per node it skips (thousands): say what is done here instead.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    bits = {"int8": 8, "int4": 4}[weights]
    directory = Path(directory)
    protos = {name: onnx.load(str(directory / name)) for name in [main, *graphs, *others]}
    for name in [main, *graphs]:
        log(f"quantizing {name}'s MatMul weights to {weights} (block {BLOCK_SIZE})")
        quantizer = MatMulNBitsQuantizer(protos[name], bits=bits, block_size=BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
        quantizer.process()
        protos[name] = quantizer.model.model
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


def count_quantized(path: Path) -> int:
    """MatMulNBits nodes in the graph at `path` (what a quantized build must show)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type == "MatMulNBits" for node in graph.node)
