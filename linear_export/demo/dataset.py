"""A procedural, class-conditional image dataset: 10 classes of 64x64 shapes and textures.

Every image is a pure function of (seed, split, index): its parameters come from a numpy
generator keyed by those three numbers, so any image can be re-rendered alone and nothing is
downloaded. Shapes are drawn on the demo tokenizer's 16x16 token grid (each 4x4 pixel block
is one flat colour, decided at its centre) in two colours of an 8-colour palette: every
token is a flat colour, so a tiny VQ gives it one code and a tiny GPT learns the structure
from a few minutes of CPU training. (Anti-aliased edges at pixel resolution were tried
first: the VQ then needs a code per edge position and colour pair, and a GPT trained for
that long produced only texture.)
The splits are disjoint by content: an image is held out exactly when its pixel hash falls
in one bucket of eight, and each split redraws parameters until its images qualify.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

IMAGE_SIZE = 64
GRID = 4  # pixels per token side of the demo tokenizer; geometry snaps to it
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "diagonal_stripes",
    "concentric_rings",
    "cross",
    "pinwheel",
)
NUM_CLASSES = len(CLASS_NAMES)

# Parameter streams; "adhoc" images (make_images) belong to no split.
SPLITS = {"train": 0, "heldout": 1, "adhoc": 2}
HELDOUT_BUCKETS = 8  # 1 in 8 distinct images is held out
_MAX_DRAWS = 10_000

_PALETTE = np.array([
    [230, 25, 25], [25, 180, 50], [40, 75, 230], [240, 215, 25],
    [155, 40, 205], [25, 205, 215], [242, 242, 242], [20, 20, 20],
], dtype=np.float32) / 255  # red, green, blue, yellow, purple, cyan, white, black


_TOKENS = IMAGE_SIZE // GRID
# Shapes are evaluated once per token: at its centre (_Y, _X) or its top-left pixel
# (_ROW, _COL), all in pixel units, each [16, 16].
_ROW, _COL = np.indices((_TOKENS, _TOKENS)) * GRID
_Y, _X = (_ROW + GRID / 2).astype(np.float32), (_COL + GRID / 2).astype(np.float32)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two different palette colours: (background, foreground)."""
    first, second = rng.choice(len(_PALETTE), size=2, replace=False)
    return _PALETTE[first], _PALETTE[second]


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Coverage from a signed distance (positive inside); render() thresholds it at 0.5."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _bands(coordinate: np.ndarray, width: int, offset: int) -> np.ndarray:
    """0/1 bands `width` pixels wide along an integer pixel coordinate."""
    return ((coordinate + offset) // width % 2).astype(np.float32)


def _on_grid(rng: np.random.Generator, low: int, high: int) -> int:
    """A random multiple of GRID in [low, high]."""
    return GRID * int(rng.integers(-(-low // GRID), high // GRID + 1))


def _circle(rng: np.random.Generator) -> np.ndarray:
    radius = float(rng.choice([10.0, 14.0, 18.0, 22.0]))
    cy, cx = (_on_grid(rng, int(radius) - 4, IMAGE_SIZE - int(radius) + 4) for _ in range(2))
    return _coverage(radius - np.hypot(_Y - cy, _X - cx))


def _square(rng: np.random.Generator) -> np.ndarray:
    side = _on_grid(rng, 12, 40)
    top, left = (_on_grid(rng, 0, IMAGE_SIZE - side) for _ in range(2))
    inside = (_ROW >= top) & (_ROW < top + side) & (_COL >= left) & (_COL < left + side)
    return inside.astype(np.float32)


def _triangle(rng: np.random.Generator) -> np.ndarray:
    """Upward isosceles triangle with 2:1 sides: inside all three edge half-planes."""
    height = 8 * int(rng.integers(3, 7))
    half_base = height / 2
    top = _on_grid(rng, 0, IMAGE_SIZE - height)
    cx = _on_grid(rng, int(half_base) - 8, IMAGE_SIZE - int(half_base) + 8)
    bottom = top + height
    norm = np.hypot(height, half_base)
    # Signed distances to the two slanted edges and to the base (positive inside).
    left = ((_X - (cx - half_base)) * height + (_Y - bottom) * half_base) / norm
    right = (((cx + half_base) - _X) * height + (_Y - bottom) * half_base) / norm
    return _coverage(np.minimum(np.minimum(left, right), bottom - _Y))


def _stripe_geometry(rng: np.random.Generator) -> tuple[int, int]:
    width = GRID * int(rng.integers(1, 4))
    return width, _on_grid(rng, 0, 2 * width - GRID)


def _horizontal_stripes(rng: np.random.Generator) -> np.ndarray:
    return _bands(_ROW, *_stripe_geometry(rng))


def _vertical_stripes(rng: np.random.Generator) -> np.ndarray:
    return _bands(_COL, *_stripe_geometry(rng))


def _checkerboard(rng: np.random.Generator) -> np.ndarray:
    cell = GRID * int(rng.integers(1, 5))
    rows = _bands(_ROW, cell, _on_grid(rng, 0, 2 * cell - GRID))
    cols = _bands(_COL, cell, _on_grid(rng, 0, 2 * cell - GRID))
    return np.abs(rows - cols)


def _diagonal_stripes(rng: np.random.Generator) -> np.ndarray:
    """45-degree bands, either direction; edges pass through token corners."""
    width = GRID * int(rng.integers(2, 5))
    along = _ROW + _COL if rng.random() < 0.5 else _ROW - _COL + IMAGE_SIZE
    return _bands(along, width, _on_grid(rng, 0, 2 * width - GRID))


def _concentric_rings(rng: np.random.Generator) -> np.ndarray:
    cy, cx = (_on_grid(rng, 16, 48) for _ in range(2))
    width = float(rng.choice([8.0, 12.0]))
    radius = np.hypot(_Y - cy, _X - cx)
    # Distance to the nearest ring edge, signed: positive on the "on" rings.
    distance = np.abs(np.mod(radius, 2 * width) - width) - width / 2
    return _coverage(distance)


def _cross(rng: np.random.Generator) -> np.ndarray:
    half_width = float(rng.choice([4.0, 8.0]))
    arm = _on_grid(rng, 12, 24)
    cy, cx = (_on_grid(rng, arm - 4, IMAGE_SIZE - arm + 4) for _ in range(2))
    dy, dx = np.abs(_Y - cy), np.abs(_X - cx)
    inside = ((dy < half_width) & (dx < arm)) | ((dx < half_width) & (dy < arm))
    return inside.astype(np.float32)


def _pinwheel(rng: np.random.Generator) -> np.ndarray:
    """Alternating angular sectors around a token corner (radial texture)."""
    cy, cx = (_on_grid(rng, 20, 44) for _ in range(2))
    sectors = int(rng.integers(2, 5))  # pairs of sectors: 4 to 8 wedges
    angle = np.arctan2(_Y - cy, _X - cx) + np.deg2rad(15.0 * int(rng.integers(0, 12)))
    radius = np.maximum(np.hypot(_Y - cy, _X - cx), 1e-3)
    period = 2 * np.pi / sectors
    # Angular square wave measured in pixels of arc (positive inside the "on" sectors).
    distance = (np.abs(np.mod(angle, period) - period / 2) - period / 4) * radius
    return _coverage(distance)


_RENDERERS = (
    _circle, _square, _triangle, _horizontal_stripes, _vertical_stripes, _checkerboard,
    _diagonal_stripes, _concentric_rings, _cross, _pinwheel,
)


def render(class_id: int, rng: np.random.Generator) -> np.ndarray:
    """One image of a class as float32 [3, 64, 64] in [0, 1]."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class id {class_id} is outside 0..{NUM_CLASSES - 1}")
    back, fore = _colours(rng)
    tokens = _RENDERERS[class_id](rng) >= 0.5  # [16, 16]: foreground tokens
    mask = np.kron(tokens, np.ones((GRID, GRID), dtype=bool))
    return np.where(mask[None], fore[:, None, None], back[:, None, None]).astype(np.float32)


def in_heldout(image: torch.Tensor | np.ndarray) -> bool:
    """Whether an image [3, 64, 64] in [-1, 1] belongs to the held-out split (by pixel hash)."""
    # numpy, not torch: tiny torch ops pay for a thread pool on every call.
    pixels = np.round((np.clip(np.asarray(image), -1, 1) + 1) * 127.5).astype(np.uint8)
    digest = hashlib.sha256(pixels.tobytes()).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_BUCKETS == 0


def _render_in_split(class_id: int, split: str, rng: np.random.Generator) -> np.ndarray:
    """Draw images of the class until one belongs to `split` (any image for "adhoc")."""
    for _ in range(_MAX_DRAWS):
        image = render(class_id, rng) * np.float32(2.0) - np.float32(1.0)
        if split == "adhoc" or in_heldout(image) == (split == "heldout"):
            return image
    raise RuntimeError(f"no {split} image of class {class_id} in {_MAX_DRAWS} draws")


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def make_images(
    class_ids: Sequence[int] | torch.Tensor, seed: int, *, split: str = "adhoc", start: int = 0
) -> torch.Tensor:
    """Images [B, 3, 64, 64] float32 in [-1, 1]; image i is keyed by (seed, split, start + i)."""
    ids = [int(c) for c in class_ids]
    images = [_render_in_split(c, split, _image_rng(seed, split, start + i))
              for i, c in enumerate(ids)]
    return torch.from_numpy(np.stack(images))


def split_labels(n: int, start: int = 0) -> torch.Tensor:
    """Balanced labels: image i of a split is class (start + i) mod 10."""
    return torch.arange(start, start + n) % NUM_CLASSES


def dataset_split(
    split: str, n: int, seed: int = 0, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [n, 3, 64, 64] in [-1, 1], labels [n]) of `split` ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    labels = split_labels(n, start)
    return make_images(labels, seed, split=split, start=start), labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255], same shape."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
