"""Evaluation-scale sampling: N images of a model, in fixed shards, in-process or over Ray.

Every sample goes through `runtime.generate.generate`; the images do not depend on the number
of workers, on which worker ran a shard, or on retries, because:

- sample `i` has class `classes[i % len(classes)]` (round-robin, so any prefix is balanced)
  and seed `sample_seed(seed, i)`, given to `generate` as one seed per condition: each image
  draws from its own torch.Generator, whatever shares its batch;
- shards are fixed index ranges of `shard_size`, each generated as one batch, always the
  same one (batched matmuls could otherwise round differently for a different batch), and
  each image is VQ-decoded alone (the decoder's convolutions do round differently by batch);
- a worker runs with `cpu_threads` intra-op threads, part of the spec, since CPU reductions
  round differently with a different thread count.

See `shards.py` for the layout on disk and how resume and retries stay exact.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

from ..engines import ENGINES
from ..errors import UserError
from ..models.families.llamagen import check_class_ids
from ..outputs import json_bytes, write_atomic
from ..runtime.sampling import SamplingConfig
from .engines import open_engine, open_source
from .models import ModelSource, load_source, load_vq_decoder
from .policy import make_policy
from .shards import MANIFEST, NPZ, SPEC, Shard, complete_shard, plan_shards, write_npz, write_shard

SEED_RULE = "seed(i) = base_seed * 1000003 + i; one torch.Generator per sample"
CLASS_RULE = "class(i) = classes[i % len(classes)]"
RAY_MISSING = "Ray is not installed; pip install 'linear-export[ray]' or run with --workers 0."
FAULT_ENV = "LINEAR_EXPORT_SAMPLE_FAULT"  # tests: "SHARD:MARKER" exits a worker once on SHARD
DEFAULT_SHARD_SIZE = 32
FAMILIES = ("llamagen",)


def sample_seed(base_seed: int, index: int) -> int:
    return base_seed * 1_000_003 + index


@dataclass(frozen=True)
class SampleSpec:
    """What to sample; picklable, and its JSON (spec.json) decides whether a rerun resumes.

    With no checkpoint, random_weights or artifact, the bundled demo model runs. `policy`
    may carry its budget ("linear:1/6"); `policy_knobs` are PolicyConfig fields (anchor,
    lookahead, ...) and `head_budgets` (a file). `classes` empty means all the model's
    classes; `num_samples` None means `per_class` per class.
    """

    checkpoint: str | None = None
    model_name: str | None = None  # default: GPT-B, or the demo's
    image_size: int | None = None  # default: 256, or the demo's / the artifact's
    dtype: str = "fp32"
    random_weights: bool = False
    weights_seed: int = 0
    family: str = "llamagen"
    engine: str = "torch"
    artifact: str | None = None
    device: str = "cpu"
    policy: str = "linear"
    budget: str = "1/4"
    policy_knobs: dict = field(default_factory=dict)
    cfg_scale: float | None = None  # default: 4.0, or 1.0 for the demo
    temperature: float = 1.0
    top_k: int = 2000
    top_p: float = 1.0
    vq_checkpoint: str | None = None
    vq_model: str = "VQ-16"
    classes: tuple[int, ...] = ()
    per_class: int = 50
    num_samples: int | None = None
    seed: int = 0
    cpu_threads: int = 1

    @property
    def demo(self) -> bool:
        return self.checkpoint is None and not self.random_weights and self.artifact is None

    def to_json(self) -> dict:
        payload = asdict(self)
        payload["classes"] = list(self.classes)
        return payload


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


# --- the spec, resolved and checked before any work ------------------------------------------

def resolve(spec: SampleSpec) -> SampleSpec:
    """Fill the defaults (demo weights, model name, image size, CFG, classes) and check it all."""
    from ..models import get_config

    if spec.family not in FAMILIES:
        raise UserError(f"sample runs --family llamagen (class-conditional) only for now, not "
                        f"{spec.family!r}; drop --family.")
    if ":" in spec.policy:
        name, budget = spec.policy.split(":", 1)
        spec = replace(spec, policy=name, budget=budget)
    if spec.engine not in ENGINES:
        raise UserError(f"Unknown engine '{spec.engine}'; choose one of: {', '.join(ENGINES)}.")
    if spec.cpu_threads < 1:
        raise UserError(f"--cpu-threads {spec.cpu_threads} must be at least 1.")
    if spec.per_class < 1:
        raise UserError(f"--per-class {spec.per_class} must be at least 1.")
    if spec.num_samples is not None and spec.num_samples < 1:
        raise UserError(f"--num-samples {spec.num_samples} must be at least 1.")
    if spec.artifact is not None:
        from ..export.artifact import load_artifact

        if spec.engine not in ("ort", "tensorrt"):
            raise UserError("--artifact runs on the ort or tensorrt engine; add --engine ort.")
        if spec.checkpoint is not None or spec.random_weights:
            raise UserError("--artifact already holds the weights; drop --checkpoint and "
                            "--random-weights.")
        manifest = load_artifact(spec.artifact, check_hashes=False).manifest
        built = {"model_name": manifest["model"]["name"], "image_size": manifest["image_size"],
                 "dtype": manifest["dtype"]}
        for name, value in built.items():
            given = getattr(spec, name)
            if name != "dtype" and given is not None and given != value:
                raise UserError(f"--{name.replace('_name', '').replace('_', '-')} {given} "
                                f"contradicts the artifact, built with {value}.")
        spec = replace(spec, artifact=str(Path(spec.artifact).resolve()), **built)
        if spec.vq_checkpoint is None and "vq_decoder" not in manifest:
            raise UserError(f"Artifact '{spec.artifact}' has no VQ decoder; pass --vq-checkpoint "
                            "to turn its tokens into images.")
    elif spec.engine == "tensorrt":
        raise UserError("--engine tensorrt runs a built artifact's plans; pass --artifact DIR "
                        "from linear-export build --tensorrt.")
    if spec.demo:
        from ..demo import DEMO_DIR, DEMO_IMAGE_SIZE, DEMO_MODEL_NAME, DEMO_VQ_NAME

        if spec.model_name not in (None, DEMO_MODEL_NAME):
            raise UserError(f"No weights given for --model {spec.model_name}; pass --checkpoint "
                            "PATH or --random-weights (without them the bundled demo runs).")
        spec = replace(spec, checkpoint=str(DEMO_DIR / "gpt.safetensors"),
                       model_name=DEMO_MODEL_NAME, image_size=spec.image_size or DEMO_IMAGE_SIZE,
                       cfg_scale=1.0 if spec.cfg_scale is None else spec.cfg_scale)
        if spec.vq_checkpoint is None:
            spec = replace(spec, vq_checkpoint=str(DEMO_DIR / "vq.safetensors"),
                           vq_model=DEMO_VQ_NAME)
    elif spec.artifact is None and spec.vq_checkpoint is None:
        raise UserError("sample writes images: pass --vq-checkpoint (the GPT's VQ tokenizer), or "
                        "an --artifact built with its VQ decoder.")
    spec = replace(spec, model_name=spec.model_name or "GPT-B",
                   image_size=spec.image_size or 256,
                   cfg_scale=4.0 if spec.cfg_scale is None else spec.cfg_scale)
    for name in ("checkpoint", "vq_checkpoint"):
        path = getattr(spec, name)
        if path is not None:
            if not Path(path).is_file():
                raise UserError(f"--{name.replace('_', '-')} '{path}' does not exist.")
            spec = replace(spec, **{name: str(Path(path).resolve())})
    config = get_config(spec.model_name)
    classes = spec.classes or tuple(range(config.num_classes))
    check_class_ids(classes, config.num_classes)
    spec = replace(spec, classes=tuple(classes))
    _policy_and_sampling(spec, _source(spec))  # fails here, not in a worker
    return spec


def total_samples(spec: SampleSpec) -> int:
    return spec.num_samples or spec.per_class * len(spec.classes)


def _source(spec: SampleSpec) -> ModelSource:
    return ModelSource(spec.family, spec.checkpoint, spec.model_name, spec.image_size,
                       spec.dtype, spec.device, spec.weights_seed, spec.random_weights)


def _policy_and_sampling(spec: SampleSpec, target):
    """The spec's policy for `target` (an engine, or a ModelSource before loading)."""
    policy = make_policy(spec.policy, target, budget=spec.budget, **dict(spec.policy_knobs))
    sampling = SamplingConfig(cfg_scale=spec.cfg_scale, temperature=spec.temperature,
                              top_k=spec.top_k, top_p=spec.top_p)
    return policy, sampling


# --- one worker: everything built from the spec in one place ---------------------------------

def open_worker(spec: SampleSpec):
    """(engine, policy, sampling, decode) for a resolved spec; the only place that loads."""
    import torch

    if torch.device(spec.device).type == "cpu":
        torch.set_num_threads(spec.cpu_threads)  # CPU numerics depend on the thread count
    source = _source(spec)
    if spec.artifact is not None:
        engine = open_engine(spec.artifact, spec.engine, device=spec.device,
                             threads=spec.cpu_threads)
    elif spec.engine == "torch":
        engine = open_engine(load_source(source))
    else:
        sized, sampling = _policy_and_sampling(spec, source)
        rows = min(DEFAULT_SHARD_SIZE, total_samples(spec)) * (2 if sampling.uses_cfg else 1)
        engine = open_source(source, spec.engine, policy=sized, rows=rows, device=spec.device,
                             threads=spec.cpu_threads)
    policy, sampling = _policy_and_sampling(spec, engine)
    if spec.vq_checkpoint is not None:
        vq = load_vq_decoder(spec.vq_checkpoint, spec.vq_model, engine.config).to(engine.device)
        return engine, policy, sampling, vq.decode_codes
    return engine, policy, sampling, _ort_vq_decoder(engine.artifact, spec.cpu_threads)


def _ort_vq_decoder(artifact, threads: int):
    import onnxruntime as ort

    from ..engines.ort_vq import OrtVQDecoder

    path = artifact.path / artifact.manifest["vq_decoder"]["file"]
    decoder = OrtVQDecoder(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # fixed, like the step's: the bytes depend on it
    decoder.session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    return decoder.decode_codes


class Worker:
    """One engine; generates and writes whole shards."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec
        self.engine, self.policy, self.sampling, self.decoder = open_worker(spec)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, out: Path, shard: Shard) -> dict:
        from ..runtime.decode import decode_tokens
        from ..runtime.generate import generate

        spec = self.spec
        classes = [spec.classes[i % len(spec.classes)] for i in shard.indices]
        seeds = [sample_seed(spec.seed, i) for i in shard.indices]
        started = time.perf_counter()
        result = generate(self.engine, classes, self.policy, self.sampling, seed=seeds)
        # One image per decoder call: a batch would round the convolutions differently.
        pictures = decode_tokens(self.decoder, result.tokens, batch_size=1)
        seconds = time.perf_counter() - started
        done = write_shard(out, shard, pictures, {
            "worker": self.name, "seconds": seconds, "kv_bytes": result.stats.kv_bytes,
            "full_kv_bytes": result.stats.full_kv_bytes})
        return {"shard": shard.id, "count": shard.count, "sha256": done["sha256"],
                "worker": self.name, "seconds": seconds, "kv_bytes": result.stats.kv_bytes,
                "full_kv_bytes": result.stats.full_kv_bytes, "shape": done["shape"]}


class ShardWorker:
    """Ray Data's callable class: one Worker per actor, one shard id per batch."""

    def __init__(self, spec: SampleSpec, out: str, shards: list[Shard], fault: str | None = None):
        self.worker, self.out = Worker(spec), Path(out)
        self.shards = {shard.id: shard for shard in shards}
        self.fault = fault

    def __call__(self, batch: dict) -> dict:
        rows = [self._one(int(shard_id)) for shard_id in batch["shard"]]
        return {key: [row[key] for row in rows] for key in rows[0]}

    def _one(self, shard_id: int) -> dict:
        if self.fault is not None:  # tests: die once, mid-run, on the named shard
            target, marker = self.fault.split(":", 1)
            if int(target) == shard_id and not Path(marker).exists():
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)
        row = self.worker.run(self.out, self.shards[shard_id])
        row["shape"] = json.dumps(row["shape"])
        return row


# --- the driver --------------------------------------------------------------------------------

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
    if workers < 0:
        raise UserError(f"--workers {workers} must be 0 (in-process) or more.")
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size} must be at least 1.")
    if num_gpus_per_worker < 0:
        raise UserError(f"--num-gpus-per-worker {num_gpus_per_worker} must not be negative.")
    if workers == 0 and (ray_address is not None or num_gpus_per_worker):
        raise UserError("--ray-address and --num-gpus-per-worker need Ray workers; add "
                        "--workers N.")
    ray = None
    if workers > 0:
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise UserError(RAY_MISSING) from None
    spec = resolve(spec)
    out = Path(out).resolve()
    total = total_samples(spec)
    shards = plan_shards(total, shard_size)
    _prepare(spec, out, force)
    # The shard size fixes every batch, hence the bytes: it is part of what a rerun must match.
    _check_plan(out, shard_size, force)

    from tqdm.auto import tqdm

    started = time.perf_counter()
    rows: dict[int, dict] = {}
    todo = []
    for shard in shards:
        done = complete_shard(out, shard)
        if done is None:
            todo.append(shard)
        else:
            rows[shard.id] = {**done, "reused": True}
    reused = len(rows)
    bar = tqdm(total=total, initial=total - sum(s.count for s in todo), unit="img",
               disable=not progress, file=sys.stderr, desc="sample")
    generated = 0

    def finished(row: dict) -> None:
        nonlocal generated
        rows[row["shard"]] = row
        generated += row["count"]
        bar.update(row["count"])
        bar.set_postfix_str(f"{generated / (time.perf_counter() - started):.2f} img/s")
        if on_shard is not None:
            on_shard(row)

    try:
        if todo and workers == 0:
            worker = Worker(spec)
            for shard in todo:
                finished(worker.run(out, shard))
        elif todo:
            for row in _run_ray(ray, spec, out, todo, workers, ray_address, num_gpus_per_worker):
                finished(row)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    missing = [s.name for s in shards if complete_shard(out, s) is None]
    if missing:
        raise RuntimeError(f"shards {', '.join(missing[:5])} are incomplete after the run")
    shape = tuple(rows[shards[0].id]["shape"][1:])  # [H, W, 3]
    npz_sha = write_npz(out / NPZ, shards, out, shape)
    return _finish(spec, out, shards, rows, reused, seconds, generated, npz_sha, shape,
                   workers, shard_size)


def _check_plan(out: Path, shard_size: int, force: bool) -> None:
    plan_file = out / "plan.json"
    plan = {"shard_size": shard_size}
    if plan_file.exists() and not force:
        earlier = json.loads(plan_file.read_text())
        if earlier != plan:
            raise UserError(f"'{out}' was sampled with --shard-size {earlier['shard_size']}, "
                            f"which fixes its batches; rerun with it, or pass --force.")
    write_atomic(plan_file, json_bytes(plan))


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


def _versions(ray_used: bool) -> dict:
    versions = {"python": sys.version.split()[0]}
    names = ["linear-export", "torch", "numpy", "onnxruntime"] + (["ray"] if ray_used else [])
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _finish(spec, out, shards, rows, reused, seconds, generated, npz_sha, shape, workers,
            shard_size) -> SampleSummary:
    per_worker: dict[str, dict] = {}
    for row in rows.values():
        if row.get("reused"):
            continue
        entry = per_worker.setdefault(row["worker"], {"images": 0, "seconds": 0.0})
        entry["images"] += row["count"]
        entry["seconds"] += row["seconds"]
    for entry in per_worker.values():
        entry["images_per_s"] = entry["images"] / entry["seconds"] if entry["seconds"] else 0.0
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


__all__ = ["SampleSpec", "SampleSummary", "open_worker", "sample", "sample_seed"]
