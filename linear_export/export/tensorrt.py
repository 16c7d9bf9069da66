"""TensorRT plans from an artifact's step graphs: profiles, strong typing, timing cache, manifest.

The shape and manifest logic are pure functions (tested on any machine); only `build_plan`
and `add_tensorrt_plans` need the tensorrt package and a CUDA GPU. Written against the
TensorRT 10/11 Python API: precision comes from the graph (strongly typed network), since
TensorRT 11 removed the fp16/int8 builder flags.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..hashing import sha256_file
from ..models.attention import DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD
from .artifact import MANIFEST, SCORE, STEP, STEP_DECODE
from .consistency import manifest_text

TIMING_CACHE = "tensorrt.timing_cache"  # inside the artifact, not hashed: it only speeds builds
PLAN_NAMES = {STEP: "step.plan", STEP_DECODE: "step_decode.plan", SCORE: "score.plan"}
GiB = 2**30
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TrtBuildConfig:
    """How plans are built; everything here is recorded in the manifest."""

    max_batch: int  # rows (CFG doubles them)
    opt_batch: int  # the batch the builder tunes kernels for
    workspace_bytes: int = 4 * GiB
    tf32: bool = False  # off: fp32 plans then match PyTorch within verify's 1e-4
    timing_cache: str | None = None  # a shared timing cache file [default: the artifact's own]

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"--max-batch {self.max_batch} must be at least 1.")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise UserError(f"--trt-opt-batch {self.opt_batch} must be between 1 and the "
                            f"--max-batch rows ({self.max_batch}).")
        if self.workspace_bytes < 2**20:
            raise UserError(f"--trt-workspace {self.workspace_bytes / GiB:g} GiB is too small; "
                            "give at least 0.001 (GiB), e.g. 4.")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) of the batch, of the step length T and of
    the scoring rotations R (score_position_ids [B, R, T], the scored graph's only)."""

    name: str
    batch: tuple[int, int, int]
    steps: tuple[int, int, int]
    rotations: tuple[int, int, int]

    def covers(self, batch: int, steps: int, rotations: int = 0) -> bool:
        """rotations 0: the graph takes no score_position_ids."""
        return (self.batch[0] <= batch <= self.batch[2]
                and self.steps[0] <= steps <= self.steps[2]
                and (rotations == 0 or self.rotations[0] <= rotations <= self.rotations[2]))


def default_opt_batch(max_batch: int) -> int:
    """16 rows (8 images with CFG), the bench's default, unless the plan allows fewer."""
    return min(max_batch, 16)


def profile_specs(prefix: int, max_batch: int, opt_batch: int) -> list[Profile]:
    """Decode (T = 1) and, when the prefix is longer than one token, prefill (T = prefix)."""
    batch = (1, opt_batch, max_batch)
    profiles = [Profile("decode", batch, (1, 1, 1), (1, DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD))]
    if prefix > 1:
        profiles.append(Profile("prefill", batch, (2, prefix, prefix),
                                (1, 1, MAX_LOOKAHEAD)))
    return profiles


def score_profile(width: int, capacity: int, max_batch: int, opt_batch: int) -> Profile:
    """The score graph's one profile: its queries Q (a line's, `width` at most scored) take
    the steps range, score_shifts' length the rotations range."""
    return Profile("score", (1, opt_batch, max_batch), (1, width, max(width, capacity)),
                   (1, DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD))


def dynamic_roles(inputs: list[dict]) -> dict[str, str]:
    """The graph's symbolic dim names -> 'batch' / 'steps' / 'rotations', read off input_ids
    [B, T] and score_position_ids [B, R, T] (the steps), or line_query [L, B, H, Q, D] and
    score_shifts [R] (the score graph: Q takes the steps role)."""
    specs = {spec["name"]: spec["shape"] for spec in inputs}
    if "line_query" in specs:
        query, shifts = specs["line_query"], specs.get("score_shifts", [None])
        return {query[1]: "batch", query[3]: "steps", shifts[0]: "rotations"}
    ids = specs.get("input_ids")
    if ids is None or len(ids) != 2 or not all(isinstance(d, str) for d in ids):
        raise ValueError("the step graph's input_ids must have the symbolic shape [B, T]")
    roles = {ids[0]: "batch", ids[1]: "steps"}
    scored = specs.get("score_position_ids")
    if scored is not None and len(scored) == 3 and isinstance(scored[1], str):
        roles.setdefault(scored[1], "rotations")
    return roles


def input_shape_ranges(inputs: list[dict], profile: Profile) -> dict[str, tuple[Shape, ...]]:
    """(min, opt, max) shape of every input with a symbolic dim, for IOptimizationProfile."""
    roles = dynamic_roles(inputs)
    ranges = {}
    for spec in inputs:
        dims = spec["shape"]
        if not any(isinstance(dim, str) for dim in dims):
            continue  # static inputs (cache_len) need no profile entry
        unknown = [dim for dim in dims if isinstance(dim, str) and dim not in roles]
        if unknown:
            raise ValueError(f"input {spec['name']} has a symbolic dim '{unknown[0]}' that is "
                             "neither the batch nor the step length")
        ranges[spec["name"]] = tuple(
            tuple(getattr(profile, roles[dim])[which] if isinstance(dim, str) else dim
                  for dim in dims)
            for which in range(3))
    return ranges


def tensorrt_record(*, trt_version: str, gpu: str, capability: str, config: TrtBuildConfig,
                    profiles: list[Profile], plans: dict[str, str], seconds: float) -> dict:
    """The manifest's `tensorrt` section: what the plans were built for and how."""
    options = asdict(config)
    options.pop("timing_cache")  # a path on the build machine, meaningless elsewhere
    return {"version": trt_version, "gpu": gpu, "compute_capability": capability,
            "strongly_typed": True, **options,
            "profiles": [asdict(profile) for profile in profiles],
            "plans": dict(plans), "timing_cache": TIMING_CACHE,
            "build_seconds": round(seconds, 3)}


def with_plans(manifest: dict, record: dict, plan_files: dict[str, dict]) -> dict:
    """A copy of `manifest` listing the plans (hashed like every file) and their record."""
    files = {name: entry for name, entry in manifest["files"].items()
             if name not in PLAN_NAMES.values()}
    return {**manifest, "files": {**files, **plan_files}, "tensorrt": record}


def check_plan_compatible(record: dict | None, trt_version: str, gpu: str, where: str) -> None:
    """Plans run only with the TensorRT version and GPU model they were built for."""
    rebuild = f"rebuild them with linear-export build --tensorrt --force --out {where}"
    if not record:
        raise UserError(f"Artifact '{where}' has no TensorRT plans; build it with "
                        "linear-export build --tensorrt.")
    if record["version"] != trt_version:
        raise UserError(f"The TensorRT plans in '{where}' were built with TensorRT "
                        f"{record['version']}, this is {trt_version}; {rebuild}.")
    if record["gpu"] != gpu:
        raise UserError(f"The TensorRT plans in '{where}' were built for {record['gpu']}, this "
                        f"GPU is {gpu}; {rebuild} on this machine.")


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (one sentence with the fix), or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("the tensorrt package is not installed; on an NVIDIA GPU machine run "
                "pip install 'linear-export[tensorrt]' (its libraries come from NVIDIA's "
                "package index)")
    import torch

    if not torch.cuda.is_available():
        return ("TensorRT needs a CUDA GPU and torch sees none; run on an NVIDIA GPU machine "
                "with a CUDA build of torch")
    return None


def require_tensorrt():
    """The tensorrt module, or a UserError saying what is missing and how to fix it."""
    reason = unavailable_reason()
    if reason is not None:
        raise UserError(f"TensorRT is unavailable: {reason}.")
    import tensorrt

    return tensorrt


def build_plan(trt, onnx_path: Path, plan_path: Path, profiles: list[Profile], inputs: list[dict],
               config: TrtBuildConfig, timing_cache: bytes) -> bytes:
    """Parse `onnx_path`, build one plan with `profiles`; returns the updated timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: ask for strong typing; 11 is always strongly typed (the flag is ignored).
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # the path form finds the external weights
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name} ({errors[:300]}); export it "
                        "again with linear-export build --force, or try another --opset.")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if not config.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    cache = builder_config.create_timing_cache(timing_cache)
    builder_config.set_timing_cache(cache, False)
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in input_shape_ranges(inputs, profile).items():
            optimization.set_shape(name, low, opt, high)
        builder_config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise UserError(f"TensorRT failed to build a plan from {onnx_path.name} (see its log "
                        "above); lower --max-batch or raise --trt-workspace.")
    plan_path.write_bytes(memoryview(plan))
    return bytes(memoryview(builder_config.get_timing_cache().serialize()))


def add_tensorrt_plans(directory: Path, config: TrtBuildConfig,
                       log: Callable[[str], None] = lambda line: None) -> dict:
    """Build a plan per step graph of the artifact at `directory` and record them; the record.

    Plans are written under temporary names and the manifest is replaced last (atomically),
    so a failed build leaves the artifact as it was.
    """
    trt = require_tensorrt()
    import torch

    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    if config.max_batch > int(manifest["build"]["max_batch"]):
        raise UserError(f"TensorRT --max-batch {config.max_batch} exceeds the graph's "
                        f"{manifest['build']['max_batch']}; rebuild with a larger --max-batch.")
    if manifest["build"]["attention"] != "math":
        raise UserError(f"Artifact '{directory}' has ONNX Runtime's fused attention op, which "
                        "TensorRT cannot parse; build it with --tensorrt (or --attention math).")
    profiles = profile_specs(int(manifest["layout"]["prefix"]), config.max_batch,
                             config.opt_batch)
    scoring = [score_profile(int(manifest["layout"]["width"]), int(manifest["capacity"]),
                             config.max_batch, config.opt_batch)]
    cache_path = Path(config.timing_cache) if config.timing_cache else directory / TIMING_CACHE
    timing = cache_path.read_bytes() if cache_path.is_file() else b""
    started = time.perf_counter()
    staged: dict[str, Path] = {}
    try:
        for graph in PLAN_NAMES:
            ranges = scoring if graph == SCORE else profiles
            log(f"building {PLAN_NAMES[graph]} from {graph} with TensorRT {trt.__version__} "
                f"(profiles: {', '.join(profile.name for profile in ranges)})")
            handle, name = tempfile.mkstemp(dir=directory, prefix=".plan.")
            os.close(handle)  # build_plan writes it by path
            target = Path(name)
            staged[PLAN_NAMES[graph]] = target
            timing = build_plan(trt, directory / graph, target, ranges,
                                manifest["io"][graph]["inputs"], config, timing)
        _write_atomic(cache_path, timing)
        record = tensorrt_record(
            trt_version=trt.__version__, gpu=torch.cuda.get_device_name(),
            capability="{}.{}".format(*torch.cuda.get_device_capability()), config=config,
            profiles=profiles, plans=dict(PLAN_NAMES), seconds=time.perf_counter() - started)
        record["score_profiles"] = [asdict(profile) for profile in scoring]
        files = {}
        for name, path in staged.items():
            os.chmod(path, 0o644)  # mkstemp's 0600 would hide the plan from other users
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            os.replace(path, directory / name)
        _write_atomic(directory / MANIFEST,
                      manifest_text(with_plans(manifest, record, files)).encode())
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return record


def _write_atomic(path: Path, data: bytes) -> None:
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.chmod(scratch, 0o644)
    os.replace(scratch, path)


def build_with_plans(build: Callable[[Path], object], out: Path, force: bool,
                     config: TrtBuildConfig, log: Callable[[str], None]) -> Path:
    """Export with `build(path)` into a scratch directory, add plans, then rename to `out`.

    Nothing appears at `out` unless both the ONNX export and the plans succeeded.
    """
    from .artifact import _move_into_place

    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"Artifact directory '{out}' already exists; pass --force to replace it "
                        "or choose another --out.")
    require_tensorrt()  # fail before minutes of export, not after
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".trt"))
    try:
        staged = scratch / out.name
        build(staged)
        old_cache = out / TIMING_CACHE
        if config.timing_cache is None and old_cache.is_file():
            shutil.copyfile(old_cache, staged / TIMING_CACHE)  # a rebuild reuses the timings
        add_tensorrt_plans(staged, config, log)
        _move_into_place(staged, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def skip_reason(manifest: dict, where: str) -> str | None:
    """Why an artifact's TensorRT plans cannot be compared here, or None when they can."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if not manifest.get("tensorrt"):
        return "the artifact has no TensorRT plans (build it with linear-export build --tensorrt)"
    import tensorrt
    import torch

    try:
        check_plan_compatible(manifest["tensorrt"], tensorrt.__version__,
                              torch.cuda.get_device_name(), where)
    except UserError as error:
        return str(error)
    return None
