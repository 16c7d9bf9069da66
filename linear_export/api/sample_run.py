"""Evaluation-scale sampling, the driver: N images of a spec into fixed shards, reusing the
shards an earlier run of the same spec finished, generating the rest in this process or on a
pool of Ray actors, then writing the npz and the manifest.

Why the images do not depend on how they were run is in `sample.py`; the layout on disk and
how resume and retries stay exact is in `shards.py`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import UserError
from ..outputs import json_bytes, write_atomic
from .sample import (
    CLASS_RULE,
    DEFAULT_SHARD_SIZE,
    SEED_RULE,
    SampleSpec,
    ShardWorker,
    Worker,
    resolve,
    total_samples,
)
from .shards import MANIFEST, NPZ, SPEC, Shard, complete_shard, plan_shards, write_npz

RAY_MISSING = "Ray is not installed; pip install 'linear-export[ray]' or run with --workers 0."
FAULT_ENV = "LINEAR_EXPORT_SAMPLE_FAULT"  # tests: "SHARD:MARKER" exits a worker once on SHARD


@dataclass
class SampleSummary:
    out: Path
    npz: Path
    npz_sha256: str
    samples: int
    shards: int
    reused_shards: int
    seconds: float
    images_per_s: float  # images generated this run / wall seconds of the run
    workers: dict[str, dict]  # per worker: images, seconds, images_per_s
    kv_bytes: int
    manifest: dict

    def line(self) -> str:
        per_worker = ", ".join(f"{w['images_per_s']:.2f}" for w in self.workers.values())
        if not self.workers:
            return (f"{self.samples} samples: all {self.shards} shards were complete -> "
                    f"{self.npz}, npz sha256 {self.npz_sha256[:12]}")
        return (f"{self.samples} samples in {self.shards} shards ({self.reused_shards} reused) -> "
                f"{self.npz}: {self.images_per_s:.2f} images/s in total "
                f"({len(self.workers)} worker{'s' if len(self.workers) > 1 else ''}: {per_worker} "
                f"images/s each), KV "
                f"{self.kv_bytes / 2**20:.2f} MiB per shard batch, npz sha256 "
                f"{self.npz_sha256[:12]}")


def sample(
    spec: SampleSpec,
    out: Path,
    *,
    workers: int = 0,
    ray_address: str | None = None,
    num_gpus_per_worker: float = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
    on_shard: Callable[[dict], None] | None = None,
) -> SampleSummary:
    """Sample `spec` into `out` (see shards.py for the layout); resumes the same spec's run.

    `workers` 0 runs in this process; more runs that many Ray actors (one engine each, on
    `ray_address`'s cluster or a local one), each with `num_gpus_per_worker` GPUs and
    `spec.cpu_threads` CPUs. `on_shard` sees each finished shard's row.
    """
    ray = _check_run_options(workers, ray_address, num_gpus_per_worker, shard_size)
    spec = resolve(spec)
    out = Path(out).resolve()
    shards = plan_shards(total_samples(spec), shard_size)
    _prepare(spec, out, force)
    # The shard size fixes every batch, hence the bytes: it is part of what a rerun must match.
    _check_plan(out, shard_size, force)
    started = time.perf_counter()
    tally = _Tally(shards, out, started, progress, on_shard)
    try:
        if tally.todo and workers == 0:
            _run_in_process(spec, out, tally)
        elif tally.todo:
            for row in _run_ray(ray, spec, out, tally.todo, workers, ray_address,
                                num_gpus_per_worker):
                tally.finished(row)
    finally:
        tally.bar.close()
    seconds = time.perf_counter() - started
    return _write_results(spec, out, shards, tally, seconds, workers, shard_size)


def _check_run_options(workers: int, ray_address: str | None, num_gpus_per_worker: float,
                       shard_size: int):
    """The run's options checked; the `ray` module when it runs Ray workers, else None."""
    if workers < 0:
        raise UserError(f"--workers {workers} must be 0 (in-process) or more.")
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size} must be at least 1.")
    if num_gpus_per_worker < 0:
        raise UserError(f"--num-gpus-per-worker {num_gpus_per_worker} must not be negative.")
    if workers == 0 and (ray_address is not None or num_gpus_per_worker):
        raise UserError("--ray-address and --num-gpus-per-worker need Ray workers; add "
                        "--workers N.")
    if workers == 0:
        return None
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def _prepare(spec: SampleSpec, out: Path, force: bool) -> None:
    """A new or empty --out, the same spec's earlier run (resume), or --force (restart)."""
    spec_file = out / SPEC
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; pass a directory.")
    if out.exists() and any(out.iterdir()):
        if force:
            import shutil

            retired = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, retired)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            try:
                earlier = json.loads(spec_file.read_text())
            except (OSError, ValueError):
                raise UserError(f"'{out}' already exists and holds no sample run; pass --force "
                                "to replace it or choose another --out.") from None
            if earlier != spec.to_json():
                changed = sorted(k for k in spec.to_json() if earlier.get(k) != spec.to_json()[k])
                raise UserError(f"'{out}' holds a sample run with other options "
                                f"({', '.join(changed)} differ); pass --force to restart it or "
                                "choose another --out.")
    write_atomic(spec_file, json_bytes(spec.to_json()))


def _check_plan(out: Path, shard_size: int, force: bool) -> None:
    plan_file = out / "plan.json"
    plan = {"shard_size": shard_size}
    if plan_file.exists() and not force:
        earlier = json.loads(plan_file.read_text())
        if earlier != plan:
            raise UserError(f"'{out}' was sampled with --shard-size {earlier['shard_size']}, "
                            f"which fixes its batches; rerun with it, or pass --force.")
    write_atomic(plan_file, json_bytes(plan))


class _Tally:
    """The run's shard rows (reused ones first), the shards left to do, and the progress bar."""

    def __init__(self, shards: list[Shard], out: Path, started: float, progress: bool,
                 on_shard: Callable[[dict], None] | None):
        from tqdm.auto import tqdm

        self.rows: dict[int, dict] = {}
        self.todo: list[Shard] = []
        for shard in shards:
            done = complete_shard(out, shard)
            if done is None:
                self.todo.append(shard)
            else:
                self.rows[shard.id] = {**done, "reused": True}
        self.reused = len(self.rows)
        self.generated = 0
        self.started, self.on_shard = started, on_shard
        total = shards[-1].stop
        self.bar = tqdm(total=total, initial=total - sum(s.count for s in self.todo),
                        unit="img", disable=not progress, file=sys.stderr, desc="sample")

    def finished(self, row: dict) -> None:
        self.rows[row["shard"]] = row
        self.generated += row["count"]
        self.bar.update(row["count"])
        self.bar.set_postfix_str(
            f"{self.generated / (time.perf_counter() - self.started):.2f} img/s")
        if self.on_shard is not None:
            self.on_shard(row)


def _run_in_process(spec: SampleSpec, out: Path, tally: _Tally) -> None:
    worker = Worker(spec)
    for shard in tally.todo:
        tally.finished(worker.run(out, shard))


def _run_ray(ray, spec, out, todo, workers, ray_address, num_gpus):
    """Ray Data: shard ids -> map_batches over an actor pool -> rows as shards finish."""
    if not ray.is_initialized():
        if ray_address is not None:
            ray.init(address=ray_address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, workers * spec.cpu_threads),
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)  # ray.data's INFO lines on stderr
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts samples
    context.verbose_progress = False
    dataset = ray.data.from_items([{"shard": s.id} for s in todo], override_num_blocks=len(todo))
    fault = os.environ.get(FAULT_ENV)
    # Ray Data restarts a dead actor and retries its shard (its actor pool's default
    # max_restarts=-1, max_task_retries=-1); a shard written twice is the same (shards.py).
    results = dataset.map_batches(
        ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=spec.cpu_threads, num_gpus=num_gpus or None,
        fn_constructor_kwargs={"spec": spec, "out": str(out), "shards": todo, "fault": fault},
    )
    for row in results.iter_rows():
        row = dict(row)
        row["shard"], row["count"] = int(row["shard"]), int(row["count"])
        row["shape"] = json.loads(row["shape"])
        yield row


# --- the results: npz, manifest, summary ------------------------------------------------------

def _write_results(spec, out, shards, tally, seconds, workers, shard_size) -> SampleSummary:
    """Every shard checked complete, then the npz and the manifest written."""
    missing = [s.name for s in shards if complete_shard(out, s) is None]
    if missing:
        raise RuntimeError(f"shards {', '.join(missing[:5])} are incomplete after the run")
    rows = tally.rows
    shape = tuple(rows[shards[0].id]["shape"][1:])  # [H, W, 3]
    npz_sha = write_npz(out / NPZ, shards, out, shape)
    return _finish(spec, out, shards, rows, tally.reused, seconds, tally.generated, npz_sha,
                   shape, workers, shard_size)


def _versions(ray_used: bool) -> dict:
    versions = {"python": sys.version.split()[0]}
    names = ["linear-export", "torch", "numpy", "onnxruntime"] + (["ray"] if ray_used else [])
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _per_worker(rows: dict[int, dict]) -> dict[str, dict]:
    """Images, seconds and images/s of each worker, over the shards generated this run."""
    per_worker: dict[str, dict] = {}
    for row in rows.values():
        if row.get("reused"):
            continue
        entry = per_worker.setdefault(row["worker"], {"images": 0, "seconds": 0.0})
        entry["images"] += row["count"]
        entry["seconds"] += row["seconds"]
    for entry in per_worker.values():
        entry["images_per_s"] = entry["images"] / entry["seconds"] if entry["seconds"] else 0.0
    return per_worker


def _finish(spec, out, shards, rows, reused, seconds, generated, npz_sha, shape, workers,
            shard_size) -> SampleSummary:
    per_worker = _per_worker(rows)
    kv_bytes = max(int(row.get("kv_bytes", 0)) for row in rows.values())
    full_kv = max(int(row.get("full_kv_bytes", 0)) for row in rows.values())
    total = shards[-1].stop
    images_per_s = generated / seconds if generated and seconds else 0.0
    manifest = {
        "spec": spec.to_json(),
        "versions": _versions(workers > 0),
        "seeds": SEED_RULE, "classes": CLASS_RULE,
        "determinism": "one batch per fixed shard, one image per VQ decode, "
                       f"{spec.cpu_threads} CPU threads per worker",
        "counts": {"samples": total, "shards": len(shards), "shard_size": shard_size,
                   "reused_shards": reused, "generated_shards": len(shards) - reused,
                   "per_class": {str(c): n for c, n in sorted(Counter(
                       spec.classes[i % len(spec.classes)] for i in range(total)).items())}},
        "npz": {"file": NPZ, "sha256": npz_sha, "key": "arr_0", "dtype": "uint8",
                "shape": [total, *shape]},
        "shards": {s.name: rows[s.id]["sha256"] for s in shards},
        "stats": {"seconds": seconds, "images_generated": generated,
                  "images_per_s": images_per_s, "workers": per_worker, "ray_workers": workers,
                  "kv_bytes": kv_bytes, "full_kv_bytes": full_kv},
    }
    write_atomic(out / MANIFEST, json_bytes(manifest))
    return SampleSummary(out=out, npz=out / NPZ, npz_sha256=npz_sha, samples=total,
                         shards=len(shards), reused_shards=reused, seconds=seconds,
                         images_per_s=images_per_s, workers=per_worker, kv_bytes=kv_bytes,
                         manifest=manifest)


__all__ = ["FAULT_ENV", "RAY_MISSING", "SampleSummary", "sample"]
