"""LlamaGen's 2D RoPE: image rows rotate the first half of a head, columns the second half."""

from __future__ import annotations

import torch

from .configs import SequenceLayout
from .kernels import emits_ort_kernels


def rope_table_2d(layout: SequenceLayout, head_dim: int, base: float) -> torch.Tensor:
    """cos/sin table [P + h*w, head_dim/2, 2] in float32; the P prefix rows are all zero.

    Zero rows (cos = sin = 0) make the prefix tokens' q and k exactly zero, as in LlamaGen:
    only their values matter.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    rows = torch.arange(layout.height).float()
    cols = torch.arange(layout.width).float()
    row_angles = torch.outer(rows, freqs)[:, None, :].expand(-1, layout.width, -1)
    col_angles = torch.outer(cols, freqs)[None, :, :].expand(layout.height, -1, -1)
    angles = torch.cat([row_angles, col_angles], dim=-1).flatten(0, 1)  # [h*w, half]
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(layout.prefix, half, 2), table])


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by cos_sin [B, T, D/2, 2].

    Computed in float32 and cast back, as the original does; one RotaryEmbedding op where the
    export emits ONNX Runtime's kernels.
    """
    if emits_ort_kernels():
        return _rotary_embedding(x, cos_sin)
    return rotate_pairs(x, cos_sin.unsqueeze(-3))  # broadcast over heads


def _rotary_embedding(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's RotaryEmbedding (interleaved pairs) with the step's own table rows as
    its cos/sin cache: token (b, t) reads row b * T + t, so no position needs re-gathering."""
    batch, steps, heads, head_dim = x.shape
    rows = cos_sin.reshape(batch * steps, head_dim // 2, 2)
    row_ids = torch.arange(batch * steps, device=x.device).view(batch, steps)
    flat = x.float().reshape(batch, steps, heads * head_dim)  # the op's [B, T, H*D] form
    rotated = torch.onnx.ops.symbolic(
        "com.microsoft::RotaryEmbedding", [flat, row_ids, rows[..., 0], rows[..., 1]],
        {"interleaved": 1}, dtype=flat.dtype, shape=flat.shape, version=1)
    return rotated.view(batch, steps, heads, head_dim).type_as(x)


def rotate_pairs(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., D] by cos_sin [..., D/2, 2], broadcasting.

    As x * (c, c) + (x1, x0) * (-s, s): bit for bit the original's (x0 c - x1 s, x1 c + x0 s)
    (negating a product is exact), in fewer ops on x's size (a swap, two products and a sum,
    against two selects, four products, a difference, a sum and a stack). The decode step
    rotates twice per layer, the score graph R rotations of a line's queries.
    """
    values = x.float()
    cos = cos_sin[..., 0].repeat_interleave(2, dim=-1)
    sin = cos_sin[..., 1]
    sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
    pairs = values.unflatten(-1, (-1, 2))
    swapped = torch.cat([pairs[..., 1:], pairs[..., :1]], dim=-1).flatten(-2)  # (x1, x0, ..)
    return (values * cos + swapped * sin).type_as(x)
