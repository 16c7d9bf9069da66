"""The artifacts a bench runs: one per (cache capacity, weight format) its artifact engines
need, built untimed before any measurement, reused from --artifacts-dir when they match."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .bench import (
    ARTIFACT_ENGINES,
    BenchConfig,
    artifact_key,
    engine_parts,
    load_bench_model,
    parse_policy,
)


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
    from ..engines import make_engine
    from ..export.artifact import CACHE_LAYOUTS, build_artifact, sha256_file
    from ..export.onnx_step import decode_kernel
    from ..models.families import HF_FAMILIES, hf_weights_record

    if config.family in HF_FAMILIES:
        weights = hf_weights_record(config.family, config.checkpoint)
    elif config.checkpoint is None:
        weights = {"source": "random", "seed": config.seed, "std": 0.02}
    else:
        weights = {"source": "checkpoint", "path": str(Path(config.checkpoint).resolve()),
                   "sha256": sha256_file(Path(config.checkpoint))}
    variants = ["score.onnx", "step.onnx", "step_decode.onnx"]  # as the manifest lists them
    if config.family == "llamagen-t2i":
        variants.insert(0, "prefill_embeds.onnx")
    # TensorRT parses standard ONNX only: its artifacts take the standard attention ops.
    attention = "math" if "tensorrt" in engines else "gqa"
    rows = (2 if config.cfg_scale > 1 else 1) * max(*config.batch_sizes, *config.fit_batches)
    # The max-batch search may go far above the measured batches: a generous profile.
    max_rows = 4096 if config.memory_limit is not None else max(64, rows)
    keep = config.artifacts_dir is not None
    work = Path(config.artifacts_dir) if keep else Path(tempfile.mkdtemp(prefix="le-bench."))
    # The exporter logs a warning per torchvision op it cannot register: noise here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = None
    try:
        paths: dict[str, str] = {}
        for spec, engine in ((spec, engine) for spec in config.policies for engine in engines):
            if model is None:
                model = load_bench_model(config, device="cpu")
            policy = parse_policy(spec, model.family.token_layout(model.layout), model.config)
            capacity, head_shared = policy.capacity, policy.head_shared
            weight_format = engine_parts(engine)[1]
            path = work / (f"{config.model}-{config.image_size}px-{config.dtype}-c{capacity}"
                           + ("-head-shared" if head_shared else "")
                           + ("" if weight_format == "fp32" else f"-{weight_format}"))
            wanted = {"model": config.model, "image_size": config.image_size,
                      "dtype": config.dtype, "capacity": capacity, "weights": weights,
                      "variants": variants, "max_batch": max_rows,
                      "cache_inputs": CACHE_LAYOUTS[True], "head_shared": head_shared,
                      "attention": decode_kernel(attention, True, head_shared),
                      "weight_format": weight_format, "tensorrt": "tensorrt" in engines}
            if str(path) not in paths.values() and not _reusable(path, wanted):
                log(f"building an artifact with {capacity} cache slots and {weight_format} "
                    f"weights for {spec} in {path}")
                build_artifact(model, path, model_name=config.model,
                               image_size=config.image_size, weights=weights, capacity=capacity,
                               build_options={"bench": spec}, max_batch=max_rows,
                               split_cache=True, head_shared=head_shared,
                               attention=attention, weight_format=weight_format, force=True)
                if "tensorrt" in engines:  # plans for this GPU, in the same artifact
                    from ..export.tensorrt import TrtBuildConfig, add_tensorrt_plans

                    add_tensorrt_plans(path, TrtBuildConfig(
                        max_batch=max_rows, opt_batch=min(rows, max_rows)), log)
                # let the engine cache its optimized graph now
                make_engine(engine_parts(engine)[0], artifact=path, device=config.device)
            paths[artifact_key(engine, spec)] = str(path)
        del model
        yield paths
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
