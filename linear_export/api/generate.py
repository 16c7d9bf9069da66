"""Generate images: conditions in; token grids, pictures and stats out, in batches."""

from __future__ import annotations

import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..engines.base import Engine
from ..errors import UserError
from ..outputs import json_bytes, npy_bytes
from ..runtime.decode import decode_tokens, image_grid, png_bytes
from ..runtime.generate import generate as run_generation
from ..runtime.policies import Policy
from ..runtime.sampling import SamplingConfig
from .engines import Decode

OnLine = Callable[[int, int], None]  # (lines finished so far, lines in all batches)


@dataclass
class Generation:
    """What `generate` made: one token grid (and picture) per condition, and the run's stats."""

    conditions: list
    tokens: np.ndarray  # [N, h, w] int64 image codes
    images: np.ndarray | None  # [N, H, W, 3] uint8 (PIL.Image.fromarray takes one), or None
    stats: dict
    seed: int | Sequence[int]

    def files(self) -> dict[str, bytes]:
        """The output directory's files: tokens.npy, stats.json, one PNG each and grid.png."""
        files = {"tokens.npy": npy_bytes(self.tokens), "stats.json": json_bytes(self.stats)}
        if self.images is None:
            return files
        for index, (condition, picture) in enumerate(zip(self.conditions, self.images,
                                                          strict=True)):
            seed = self.seed if isinstance(self.seed, int) else self.seed[index]
            label = f"_class{condition}" if isinstance(condition, int) else ""
            files[f"{index:04d}{label}_seed{seed}.png"] = png_bytes(picture)
        files["grid.png"] = png_bytes(image_grid(self.images))
        return files


def generate(engine: Engine, conditions: Sequence, policy: Policy,
             sampling: SamplingConfig | None = None, *, batch_size: int = 8,
             seed: int | Sequence[int] = 0, decoder: Decode | None = None,
             on_line: OnLine | None = None, progress: bool = False) -> Generation:
    """One image per condition (class ids, or a text family's prompt conditions).

    Batches of `batch_size` (CFG doubles the rows); batch k is seeded `seed + k * batch_size`,
    or with one seed per condition each image draws from its own generator. `decoder`
    (load_decoder) turns the tokens into pictures; `on_line(done, total)` follows progress."""
    sampling = sampling or SamplingConfig()
    conditions = list(conditions)
    if not conditions:
        raise UserError("No conditions given; pass at least one class id or prompt.")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1.")
    if not isinstance(seed, int) and len(seed) != len(conditions):
        raise UserError(f"{len(seed)} seeds for {len(conditions)} conditions; give one seed "
                        "or one per condition.")
    starts = range(0, len(conditions), batch_size)
    results = []
    for batch, start in enumerate(starts):
        batch_seed = seed + start if isinstance(seed, int) else seed[start:start + batch_size]
        follow = None if on_line is None else (
            lambda line, lines, batch=batch: on_line(batch * lines + line + 1,
                                                     len(starts) * lines))
        results.append(run_generation(engine, conditions[start:start + batch_size], policy,
                                      sampling, seed=batch_seed, progress=progress,
                                      on_line=follow))
    tokens = np.concatenate([result.tokens.numpy() for result in results])
    images = None if decoder is None else decode_tokens(decoder, torch.from_numpy(tokens))
    return Generation(conditions, tokens, images, _stats(engine, policy, sampling, results,
                                                          batch_size), seed)


def describe(engine: Engine) -> dict:
    """Family, model name, image size and dtype of what the engine runs."""
    artifact = getattr(engine, "artifact", None)
    if artifact is not None:
        return {"family": artifact.family_name, "model": artifact.manifest["model"]["name"],
                "image_size": artifact.manifest["image_size"], "dtype": artifact.dtype_name}
    source = getattr(engine, "source", None) or getattr(getattr(engine, "model", None),
                                                        "source", None)
    if source is None:  # an engine made without the API: what the model itself says
        return {"family": engine.family.name, "model": None,
                "image_size": engine.layout.height * engine.config.downsample,
                "dtype": str(engine.dtype).removeprefix("torch.")}
    return {"family": source.family, "model": source.model, "image_size": source.image_size,
            "dtype": source.dtype}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _stats(engine: Engine, policy: Policy, sampling: SamplingConfig, results: list,
           batch_size: int) -> dict:
    total = sum(result.stats.images for result in results)
    seconds = sum(result.stats.seconds_generate for result in results)
    largest = results[0].stats  # the first batch is the fullest
    return {
        **describe(engine),
        "policy": policy.name,
        "budget": policy.budget,
        "engine": engine.name,
        "cfg_scale": sampling.cfg_scale,
        "batch": min(batch_size, total),
        "images": total,
        "seconds_generate": seconds,
        "images_per_s": total / seconds if seconds else 0.0,
        "seconds_per_image": seconds / total,
        "kv_capacity": policy.capacity,
        "kv_bytes": largest.kv_bytes,
        "full_kv_bytes": largest.full_kv_bytes,
        "peak_cache_len": largest.peak_cache_len,
        "peak_rss_bytes": peak_rss_bytes(),
    }
