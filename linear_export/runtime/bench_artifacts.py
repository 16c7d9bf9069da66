"""The artifacts a bench runs: one per (cache capacity, weight format) its artifact engines
need, built untimed before any measurement, reused from --artifacts-dir when they match."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .bench import (
    ARTIFACT_ENGINES,
    BenchConfig,
    artifact_key,
    engine_parts,
    load_bench_model,
)
from .policy_spec import parse_policy


def _reusable(path: Path, wanted: dict) -> bool:
    """Whether the artifact at `path` was built for exactly this model, weights and capacity."""
    from ..export.artifact import load_artifact

    if not path.is_dir():
        return False
    try:
        manifest = load_artifact(path).manifest
    except UserError:
        return False
    have = {"model": manifest["model"]["name"], "image_size": manifest["image_size"],
            "dtype": manifest["dtype"], "capacity": manifest["capacity"],
            "weights": manifest["weights"], "variants": manifest["build"].get("variants"),
            "cache_inputs": manifest["build"].get("cache_inputs", "stacked"),
            "head_shared": manifest["build"].get("head_shared", False),
            "attention": manifest["build"]["attention"],
            "weight_format": manifest["build"].get("weights", "fp32")}
    return (all(have[key] == wanted[key] for key in have)
            and manifest["build"]["max_batch"] >= wanted["max_batch"]
            and (not wanted.get("tensorrt") or _plans_usable(manifest, path, wanted)))


def _plans_usable(manifest: dict, path: Path, wanted: dict) -> bool:
    """TensorRT plans built here (this GPU and TensorRT) for at least the wanted batch."""
    from ..export.tensorrt import skip_reason

    plans = manifest.get("tensorrt") or {}
    return (skip_reason(manifest, str(path)) is None
            and plans.get("max_batch", 0) >= wanted["max_batch"])


@contextmanager
def prepare_artifacts(config: BenchConfig, log: Callable[[str], None]) -> Iterator[dict]:
    """One artifact per distinct cache capacity for the artifact engines (built untimed).

    Yields {artifact_key(engine, policy spec): artifact dir}. Without `artifacts_dir` they
    are built in a temporary directory and deleted afterwards; with it, matching ones are
    reused and new ones kept.
    """
    engines = [name for name in config.engines if name in ARTIFACT_ENGINES]
    if not engines:
        yield {}
        return
    keep = config.artifacts_dir is not None
    work = Path(config.artifacts_dir) if keep else Path(tempfile.mkdtemp(prefix="le-bench."))
    # The exporter logs a warning per torchvision op it cannot register: noise here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        yield _build_all(config, engines, work, log)  # the model is freed before measuring
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class SharedBuild:
    """What every artifact of one bench has in common."""

    weights: dict  # the manifest's weights record
    variants: list[str]  # the graphs, as the manifest lists them
    attention: str  # the step's attention ops
    rows: int  # the most rows a measured batch runs (CFG doubles them)
    max_rows: int  # the batch profile built for
    tensorrt: bool  # plans for this GPU too


def shared_build(config: BenchConfig, engines: list[str]) -> SharedBuild:
    variants = ["score.onnx", "step.onnx", "step_decode.onnx"]  # as the manifest lists them
    if config.family == "llamagen-t2i":
        variants.insert(0, "prefill_embeds.onnx")
    rows = (2 if config.cfg_scale > 1 else 1) * max(*config.batch_sizes, *config.fit_batches)
    tensorrt = "tensorrt" in engines
    return SharedBuild(
        weights=weights_record(config), variants=variants,
        # TensorRT parses standard ONNX only: its artifacts take the standard attention ops.
        attention="math" if tensorrt else "gqa", rows=rows,
        # The max-batch search may go far above the measured batches: a generous profile.
        max_rows=4096 if config.memory_limit is not None else max(64, rows), tensorrt=tensorrt)


def weights_record(config: BenchConfig) -> dict:
    """Where the bench's weights come from, as build_artifact records it (and reuse checks)."""
    from ..models.families import weights_record as record

    return record(config.family, config.checkpoint, config.seed)


def _build_all(config: BenchConfig, engines: list[str], work: Path,
               log: Callable[[str], None]) -> dict[str, str]:
    """Each (policy spec, artifact engine)'s artifact directory, built where none matches."""
    build = shared_build(config, engines)
    model = None
    paths: dict[str, str] = {}
    for spec, engine in ((spec, engine) for spec in config.policies for engine in engines):
        if model is None:
            model = load_bench_model(config, device="cpu")
        policy = parse_policy(spec, model.family.token_layout(model.layout),
                              model_config=model.config)
        weight_format = engine_parts(engine)[1]
        path = work / (f"{config.model}-{config.image_size}px-{config.dtype}-c{policy.capacity}"
                       + ("-head-shared" if policy.head_shared else "")
                       + ("" if weight_format == "fp32" else f"-{weight_format}"))
        wanted = _wanted(config, build, policy, weight_format)
        if str(path) not in paths.values() and not _reusable(path, wanted):
            log(f"building an artifact with {policy.capacity} cache slots and {weight_format} "
                f"weights for {spec} in {path}")
            _build_one(model, path, config, build, spec, policy, weight_format, log)
            # let the engine cache its optimized graph now
            from ..engines import make_engine

            make_engine(engine_parts(engine)[0], artifact=path, device=config.device)
        paths[artifact_key(engine, spec)] = str(path)
    return paths


def _wanted(config: BenchConfig, build: SharedBuild, policy, weight_format: str) -> dict:
    """The manifest fields a reusable artifact must have (see _reusable)."""
    from ..export.consistency import CACHE_LAYOUTS
    from ..export.onnx_step import decode_kernel

    return {"model": config.model, "image_size": config.image_size, "dtype": config.dtype,
            "capacity": policy.capacity, "weights": build.weights, "variants": build.variants,
            "max_batch": build.max_rows, "cache_inputs": CACHE_LAYOUTS[True],
            "head_shared": policy.head_shared,
            "attention": decode_kernel(build.attention, True),
            "weight_format": weight_format, "tensorrt": build.tensorrt}


def _build_one(model, path: Path, config: BenchConfig, build: SharedBuild, spec: str, policy,
               weight_format: str, log: Callable[[str], None]) -> None:
    """The artifact for `policy`'s capacity, and its TensorRT plans when the bench runs them."""
    from ..export.artifact import build_artifact

    build_artifact(model, path, model_name=config.model, image_size=config.image_size,
                   weights=build.weights, capacity=policy.capacity,
                   build_options={"bench": spec}, max_batch=build.max_rows, split_cache=True,
                   head_shared=policy.head_shared, attention=build.attention,
                   weight_format=weight_format, force=True)
    if build.tensorrt:  # plans for this GPU, in the same artifact
        from ..export.tensorrt import TrtBuildConfig, add_tensorrt_plans

        add_tensorrt_plans(path, TrtBuildConfig(
            max_batch=build.max_rows, opt_batch=min(build.rows, build.max_rows)), log)
