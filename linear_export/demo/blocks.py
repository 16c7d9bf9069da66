"""Block-wise use of the demo VQ: every 4x4 pixel block is encoded on its own.

The VQ's convolutional encoder normally sees a block's neighbours, so one flat colour gets
a different code next to each different neighbour, and those codes also depend on blocks
the GPT has not generated yet. Encoding each block alone (in training and whenever codes
are needed) makes a token a pure function of its own pixels: on the demo data, its colour.
Decoding is unchanged (`VQModel.decode_codes` on the whole grid).
"""

from __future__ import annotations

import torch

from ..models.vq import VQModel


def to_blocks(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * (H/size) * (W/size), C, size, size], blocks in raster order."""
    batch, channels, height, width = images.shape
    blocks = images.unfold(2, size, size).unfold(3, size, size)  # [B, C, h, w, s, s]
    return blocks.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels, size, size)


def block_latents(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """Pre-quantisation latents [B, D, h, w], each computed from its own block only."""
    size = vq.config.downsample
    batch, _, height, width = images.shape
    latents = vq.quant_conv(vq.encoder(to_blocks(images, size)))  # [B*h*w, D, 1, 1]
    grid = latents.view(batch, height // size, width // size, -1)
    return grid.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_blocks(vq: VQModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> codes [B, H/ds, W/ds], one block at a time."""
    codes = [vq.quantize.nearest(block_latents(vq, chunk)) for chunk in images.split(batch_size)]
    return torch.cat(codes)
