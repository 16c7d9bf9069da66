"""Evaluation-scale sampling, the spec and the worker: what to sample, and one engine that
generates and writes whole shards (`sample_run.py` drives the workers, in-process or over Ray).

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
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..engines import ENGINES
from ..errors import UserError
from ..models.families.llamagen import check_class_ids
from ..runtime.sampling import SamplingConfig
from .engines import load_artifact_for, open_engine, open_source
from .models import ModelSource, demo_source, load_source, load_vq_decoder
from .policy import make_policy
from .shards import Shard, write_shard

SEED_RULE = "seed(i) = base_seed * 1000003 + i; one torch.Generator per sample"
CLASS_RULE = "class(i) = classes[i % len(classes)]"
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


# --- the spec, resolved and checked before any work ------------------------------------------

def resolve(spec: SampleSpec) -> SampleSpec:
    """Fill the defaults (demo weights, model name, image size, CFG, classes) and check it all."""
    spec = _check_options(spec)
    spec = _resolve_artifact(spec)
    spec = _resolve_demo(spec)
    spec = replace(spec, model_name=spec.model_name or "GPT-B",
                   image_size=spec.image_size or 256,
                   cfg_scale=4.0 if spec.cfg_scale is None else spec.cfg_scale)
    spec = _resolve_paths(spec)
    spec = _resolve_classes(spec)
    _policy_and_sampling(spec, _source(spec))  # fails here, not in a worker
    return spec


def _check_options(spec: SampleSpec) -> SampleSpec:
    """The family, engine and counts checked; a "name:budget" policy split in two."""
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
    return spec


def _resolve_artifact(spec: SampleSpec) -> SampleSpec:
    """With --artifact: its model name, image size and dtype, and a check that it can decode."""
    if spec.artifact is None:
        if spec.engine == "tensorrt":
            raise UserError("--engine tensorrt runs a built artifact's plans; pass --artifact "
                            "DIR from linear-export build --tensorrt.")
        return spec
    artifact = load_artifact_for(
        spec.artifact, spec.engine, weights_given=spec.checkpoint is not None or
        spec.random_weights, family=spec.family, model=spec.model_name,
        image_size=spec.image_size, check_hashes=False)
    manifest = artifact.manifest
    built = {"model_name": manifest["model"]["name"], "image_size": manifest["image_size"],
             "dtype": manifest["dtype"]}
    spec = replace(spec, artifact=str(Path(spec.artifact).resolve()), **built)
    if spec.vq_checkpoint is None and "vq_decoder" not in manifest:
        raise UserError(f"Artifact '{spec.artifact}' has no VQ decoder; pass --vq-checkpoint "
                        "to turn its tokens into images.")
    return spec


def _resolve_demo(spec: SampleSpec) -> SampleSpec:
    """With no weights given: the bundled demo's GPT and VQ; otherwise a check for a decoder."""
    if not spec.demo:
        if spec.artifact is None and spec.vq_checkpoint is None:
            raise UserError("sample writes images: pass --vq-checkpoint (the GPT's VQ "
                            "tokenizer), or an --artifact built with its VQ decoder.")
        return spec
    from ..demo import DEMO_DIR, DEMO_MODEL_NAME, DEMO_VQ_NAME

    demo = demo_source(ModelSource(model=spec.model_name or DEMO_MODEL_NAME,
                                   image_size=spec.image_size or 0),
                       model_given=spec.model_name is not None,
                       image_size_given=spec.image_size is not None)
    spec = replace(spec, checkpoint=demo.checkpoint, model_name=demo.model,
                   image_size=demo.image_size,
                   cfg_scale=demo.default_cfg_scale if spec.cfg_scale is None else spec.cfg_scale)
    if spec.vq_checkpoint is None:
        spec = replace(spec, vq_checkpoint=str(DEMO_DIR / "vq.safetensors"),
                       vq_model=DEMO_VQ_NAME)
    return spec


def _resolve_paths(spec: SampleSpec) -> SampleSpec:
    """The GPT and VQ checkpoints checked to exist, as absolute paths."""
    for name in ("checkpoint", "vq_checkpoint"):
        path = getattr(spec, name)
        if path is not None:
            if not Path(path).is_file():
                raise UserError(f"--{name.replace('_', '-')} '{path}' does not exist.")
            spec = replace(spec, **{name: str(Path(path).resolve())})
    return spec


def _resolve_classes(spec: SampleSpec) -> SampleSpec:
    """The classes to sample: the given ones, checked, or all the model's."""
    from ..models import get_config

    config = get_config(spec.model_name)
    classes = spec.classes or tuple(range(config.num_classes))
    check_class_ids(classes, config.num_classes)
    return replace(spec, classes=tuple(classes))


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


__all__ = ["SampleSpec", "open_worker", "resolve", "sample_seed", "total_samples"]
