"""The 2D RoPE against an independent complex-number computation from the stated facts."""

from __future__ import annotations

import numpy as np
import torch

from linear_export.models.configs import SequenceLayout
from linear_export.models.rope import apply_rope, rope_table_2d


def reference_rotation(x: np.ndarray, row: int, col: int, base: float) -> np.ndarray:
    """Rotate interleaved pairs: first half of the pairs by the row, second half by the column."""
    head_dim = x.shape[-1]
    quarter = head_dim // 4
    freqs = np.array([base ** (-(2 * i) / (head_dim / 2)) for i in range(quarter)])
    angles = np.concatenate([row * freqs, col * freqs])
    pairs = x[0::2] + 1j * x[1::2]
    rotated = pairs * np.exp(1j * angles)
    out = np.empty_like(x)
    out[0::2], out[1::2] = rotated.real, rotated.imag
    return out


def test_rows_rotate_first_half_columns_second_half() -> None:
    layout = SequenceLayout(prefix=2, height=3, width=5)
    head_dim, base = 16, 10000.0
    table = rope_table_2d(layout, head_dim, base)
    x = torch.randn(1, layout.length, 1, head_dim)
    rotated = apply_rope(x, table[None])
    for k in range(layout.image_tokens):
        position = layout.prefix + k
        expected = reference_rotation(x[0, position, 0].double().numpy(), k // 5, k % 5, base)
        np.testing.assert_allclose(rotated[0, position, 0].numpy(), expected, atol=1e-5)


def test_prefix_rows_are_zero_so_prefix_q_and_k_vanish() -> None:
    layout = SequenceLayout(prefix=3, height=2, width=2)
    table = rope_table_2d(layout, 8, 10000.0)
    assert torch.equal(table[:3], torch.zeros(3, 4, 2))
    x = torch.randn(2, layout.length, 2, 8)
    rotated = apply_rope(x, table.expand(2, -1, -1, -1))
    assert torch.equal(rotated[:, :3], torch.zeros(2, 3, 2, 8))
    assert rotated[:, 3:].abs().sum() > 0


def test_first_image_token_is_unrotated_and_fp16_cast_back() -> None:
    layout = SequenceLayout(prefix=1, height=2, width=2)
    table = rope_table_2d(layout, 8, 10000.0)
    x = torch.randn(1, layout.length, 1, 8).half()
    rotated = apply_rope(x, table[None])
    assert rotated.dtype == torch.float16
    assert torch.equal(rotated[0, 1], x[0, 1])  # row 0, column 0: angle 0


def test_rotation_is_bit_for_bit_the_originals_formula() -> None:
    """rotate_pairs computes x * (c, c) + (x1, x0) * (-s, s) (fewer graph ops); it must equal
    LlamaGen's (x0 c - x1 s, x1 c + x0 s) to the bit, as the greedy parity with the original
    code rests on it. Reference: float32 numpy, one IEEE op at a time."""
    from linear_export.models.rope import rotate_pairs

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 1, 5, 16, generator=generator) * 7
    cos_sin = torch.randn(2, 1, 8, 2, generator=generator)  # broadcast: [3, 4, 2, 5, 16]
    got = rotate_pairs(x, cos_sin).numpy()
    xs, table = x.numpy(), cos_sin.numpy()
    x0, x1, c, s = xs[..., 0::2], xs[..., 1::2], table[..., 0], table[..., 1]
    want = np.empty(got.shape, np.float32)
    want[..., 0::2] = x0 * c - x1 * s
    want[..., 1::2] = x1 * c + x0 * s
    assert want.dtype == np.float32 and got.shape == (3, 4, 2, 5, 16)
    assert np.array_equal(got, want)
