"""Writing results safely: never overwrite without --force, never leave a half-written file."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import UserError


def check_writable(path: Path, force: bool) -> None:
    """Refuse, before any work is done, to overwrite an existing output without --force."""
    if path.exists() and not force:
        raise UserError(f"'{path}' already exists; pass --force to overwrite it or choose "
                        "another path.")


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def write_failure(path: Path, error: OSError) -> UserError:
    """A failed write (full disk, no permission) as one sentence; nothing is left half-written."""
    reason = error.strerror or str(error) or type(error).__name__
    fix = "free some disk space or" if error.errno in FULL_DISK else "check the path, or"
    return UserError(f"Cannot write '{path}' ({reason}); nothing was written there, so {fix} "
                     "choose another path and run again.")


@contextmanager
def clear_write_errors(path: Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into write_failure's one sentence."""
    try:
        yield
    except OSError as error:
        raise write_failure(path, error) from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place."""
    with clear_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def json_bytes(payload: dict) -> bytes:
    return (json.dumps(payload, indent=2) + "\n").encode()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, json_bytes(payload))


def write_npy(path: Path, array: np.ndarray) -> None:
    write_atomic(path, npy_bytes(array))


def write_directory(out: Path, files: dict[str, bytes], force: bool) -> None:
    """Write `files` into a new directory and rename it to `out` when complete.

    With `force`, an existing `out` is replaced only after the new one is fully written.
    """
    if out.exists() and not force:
        raise UserError(f"Output directory '{out}' already exists; pass --force to replace it "
                        "or choose another --out.")
    with clear_write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            if out.exists():
                retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.",
                                                suffix=".old"))
                os.replace(out, retired / out.name)
                os.replace(staging, out)
                shutil.rmtree(retired)
            else:
                os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
