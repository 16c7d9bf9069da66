"""Export a VQ decoder (codes -> images) to ONNX: LlamaGen's VQModel or Chameleon's VQGAN."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from linear_export.models.chameleon_vq import ChameleonVQDecoder
from linear_export.models.vq import VQModel

Decoder = VQModel | ChameleonVQDecoder  # anything with decode_codes(codes [B, h, w])

INPUT_NAME = "codes"
OUTPUT_NAME = "images"


class _DecodeCodes(nn.Module):
    """Wraps `VQModel.decode_codes` as a module's forward, which the exporter needs."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode_codes(codes)


def export_vq_decoder(
    model: Decoder, path: Path, opset: int = 18, *, grid: int | tuple[int, int] = 16
) -> None:
    """Write `decode_codes` as ONNX: int64 codes [B, h, w] -> float32 images [B, 3, H, W]."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    # The dynamo exporter specialises any dimension whose example size is 1, so the example
    # batch is 2; the grid (h, w) stays static, as the step graph's is.
    example = torch.zeros(2, h, w, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=4096)
    wrapper = _DecodeCodes(model).eval().float()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"codes": {0: batch}},
            external_data=False,  # the decoder is ~170 MB in fp32, under protobuf's 2 GB
            verbose=False,
        )
    program.save(str(path), external_data=False)
    _check_io(path, h, w)


def _check_io(path: Path, h: int, w: int) -> None:
    """Fail loudly if the exporter froze the batch dimension or renamed the IO."""
    graph = onnx.load(str(path), load_external_data=False).graph
    (inp,), (out,) = graph.input, graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    if inp.name != INPUT_NAME or out.name != OUTPUT_NAME or not isinstance(dims[0], str):
        raise RuntimeError(f"exported VQ decoder has unexpected IO: {inp.name}{dims} -> {out.name}")
    if dims[1:] != [h, w]:
        raise RuntimeError(f"exported VQ decoder expects grid {dims[1:]}, wanted {[h, w]}")
