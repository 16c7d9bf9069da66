"""Token grids to pictures: VQ decoding in batches, uint8 conversion, PNG bytes, a sample grid."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

Decoder = Callable[[torch.Tensor], torch.Tensor]  # codes [B, h, w] -> images [B, 3, H, W]


def decode_batches(decode: Decoder, tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Float images [N, 3, H, W] in [-1, 1] from token grids [N, h, w], `batch_size` at a time."""
    with torch.inference_mode():
        return torch.cat([decode(tokens[start:start + batch_size].long()).float()
                          for start in range(0, tokens.shape[0], batch_size)])


def decode_tokens(decode: Decoder, tokens: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Pictures [N, H, W, 3] uint8 from token grids [N, h, w]."""
    return to_uint8(decode_batches(decode, tokens, batch_size))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    scaled = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def image_grid(pictures: np.ndarray, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Tile [N, H, W, 3] pictures into one picture, `columns` wide, on a white background."""
    count, height, width, channels = pictures.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, channels), 255,
                   dtype=np.uint8)
    for index, picture in enumerate(pictures):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        grid[top:top + height, left:left + width] = picture
    return grid
