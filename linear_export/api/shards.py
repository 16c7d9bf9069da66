"""Sample shards on disk: fixed index ranges, atomic shard directories, resume checks, the .npz.

Layout under the output directory:

    spec.json                     what is being sampled (a rerun with the same spec resumes)
    shards/shard-00000/000000.png one PNG per sample, named by its global index
    shards/shard-00000/done.json  written last: indices, count, sha256 of the uint8 array
    samples.npz                   arr_0: uint8 [N, H, W, 3] ordered by index (ADM's layout)
    manifest.json                 the spec, versions, seed rule, counts, npz sha256, stats

A shard directory is staged beside its final name and renamed into place complete, so a
shard is either absent or whole; writing one twice (a retried task) leaves the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..outputs import clear_write_errors, json_bytes
from ..runtime.decode import png_bytes

SHARDS, DONE, NPZ = "shards", "done.json", "samples.npz"
MANIFEST, SPEC = "manifest.json", "spec.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed entry time: the .npz bytes depend on the images only


@dataclass(frozen=True)
class Shard:
    """Samples [start, stop): the same range whatever the number of workers."""

    id: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"shard-{self.id:05d}"

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)


def plan_shards(total: int, shard_size: int) -> list[Shard]:
    return [Shard(k, start, min(start + shard_size, total))
            for k, start in enumerate(range(0, total, shard_size))]


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def array_sha256(pictures: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pictures, dtype=np.uint8).tobytes()).hexdigest()


def shard_dir(out: Path, shard: Shard) -> Path:
    return out / SHARDS / shard.name


def write_shard(out: Path, shard: Shard, pictures: np.ndarray, record: dict) -> dict:
    """Stage the shard's PNGs and done.json, then rename the directory into place.

    Returns the done record (with count and sha256). A shard already complete there (another
    attempt of the same task finished first) is kept: both hold the same bytes.
    """
    if pictures.shape[0] != shard.count or pictures.dtype != np.uint8:
        raise ValueError(f"{shard.name} expects {shard.count} uint8 pictures, got "
                         f"{pictures.shape} {pictures.dtype}")
    done = {"shard": shard.id, "start": shard.start, "stop": shard.stop, "count": shard.count,
            "shape": list(pictures.shape), "sha256": array_sha256(pictures), **record}
    final = shard_dir(out, shard)
    with clear_write_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{shard.name}.", suffix=".tmp"))
        try:
            for index, picture in zip(shard.indices, pictures, strict=True):
                (staging / png_name(index)).write_bytes(png_bytes(picture))
            (staging / DONE).write_bytes(json_bytes(done))  # last: it marks the shard whole
            if final.exists():
                if complete_shard(out, shard) is not None:
                    return done  # a finished duplicate: identical content, keep it
                retired = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{shard.name}.",
                                                suffix=".old"))
                os.replace(final, retired / shard.name)  # a partial shard: set it aside
                shutil.rmtree(retired, ignore_errors=True)
            try:
                os.replace(staging, final)
            except OSError:
                if complete_shard(out, shard) is None:  # lost a race to a whole shard: fine
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return done


def read_done(out: Path, shard: Shard) -> dict | None:
    """The shard's done record when it names this range; None when absent or unreadable."""
    try:
        done = json.loads((shard_dir(out, shard) / DONE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or (done.get("start"), done.get("stop"), done.get("count")) \
            != (shard.start, shard.stop, shard.count):
        return None
    return done


def load_shard(out: Path, shard: Shard) -> np.ndarray | None:
    """The shard's pictures [count, H, W, 3], or None when any PNG is missing or unreadable."""
    directory = shard_dir(out, shard)
    pictures = []
    for index in shard.indices:
        try:
            with Image.open(directory / png_name(index)) as image:
                pictures.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError):
            return None
    return np.stack(pictures)


def complete_shard(out: Path, shard: Shard) -> dict | None:
    """The done record of a whole shard: its count and its PNGs' hash match done.json."""
    done = read_done(out, shard)
    if done is None:
        return None
    pictures = load_shard(out, shard)
    if pictures is None or array_sha256(pictures) != done.get("sha256"):
        return None
    return done


def iter_shards(out: Path, shards: list[Shard]) -> Iterator[np.ndarray]:
    for shard in shards:
        pictures = load_shard(out, shard)
        done = read_done(out, shard)
        if pictures is None or done is None or array_sha256(pictures) != done["sha256"]:
            raise RuntimeError(f"{shard.name} changed on disk while the .npz was written")
        yield pictures


def write_npz(path: Path, shards: list[Shard], out: Path, shape: tuple[int, int, int]) -> str:
    """Stream every shard, in index order, into `arr_0` of a new .npz; rename it into place.

    The zip is written here (stored, zip64, fixed entry time) rather than by np.savez so that
    it never holds all N images in memory and its bytes do not depend on when it was written.
    Returns the file's sha256.
    """
    total = shards[-1].stop if shards else 0
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (total, *shape)})
    with clear_write_errors(path):
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
                    info = zipfile.ZipInfo("arr_0.npy", date_time=_ZIP_TIME)
                    info.external_attr = 0o644 << 16
                    with archive.open(info, "w", force_zip64=True) as entry:
                        entry.write(header.getvalue())
                        for pictures in iter_shards(out, shards):
                            if pictures.shape[1:] != shape:
                                raise RuntimeError(f"shard pictures {pictures.shape[1:]} are "
                                                   f"not {shape}")
                            entry.write(pictures.tobytes())
            digest = hashlib.sha256()
            with open(temporary, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 22), b""):
                    digest.update(chunk)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return digest.hexdigest()
