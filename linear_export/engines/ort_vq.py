"""The artifact's VQ decoder (`vq_decoder.onnx`) on ONNX Runtime: codes -> images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..export.vq_onnx import INPUT_NAME, OUTPUT_NAME


class OrtVQDecoder:
    """Same call as `VQModel.decode_codes`: int codes [B, h, w] -> float images in [-1, 1]."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(str(path), options,
                                            providers=providers or ["CPUExecutionProvider"])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: np.ascontiguousarray(codes.cpu().numpy().astype(np.int64))}
        (images,) = self.session.run([OUTPUT_NAME], feed)
        return torch.from_numpy(images)
