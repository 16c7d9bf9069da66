"""Build an artifact (the exported graphs, optionally TensorRT plans) from a model source, and
the per-user cache of artifacts that `generate --engine ort` builds on demand."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from ..export.artifact import (
    ARTIFACT_DTYPES,
    Artifact,
    build_artifact,
    load_artifact,
    sha256_file,
    tool_versions,
)
from ..export.onnx_step import DEFAULT_OPSET
from ..models import GPTConfig, SequenceLayout, get_config
from ..models.families import (
    HF_FAMILIES,
    check_family,
    load_step_model,
    random_std,
    weights_record,
)
from ..outputs import clear_write_errors
from ..runtime.policies import Policy
from ..runtime.policy_spec import make_policy as layout_policy
from .models import CHAMELEON_VQ, ModelSource, load_vq_decoder

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildOptions:
    """What an artifact is built for; the CLI's `build` options."""

    policy: str = "linear"  # the policy the cache capacity is sized for (full: whole image)
    budget: str = "1/4"
    max_batch: int = 64  # most rows per step (CFG doubles the rows)
    attention: str | None = None  # gqa (ONNX Runtime's fused op) or math; None: gqa, math w/ TRT
    weights: str = "fp32"  # fp32, int8, int4 (weight-only MatMulNBits), w8a8 (dynamic int8)
    opset: int = DEFAULT_OPSET
    cache_inputs: str = "per-layer"  # or "stacked", the contract's [L, B, Hkv, C, D] form
    # A per-head budgets file (linear-export calibrate): the step takes slot_positions, and the
    # cache holds the largest count its table gives a kv head at `budget`.
    head_budgets: str | None = None
    vq_checkpoint: str | None = None  # also export this VQ decoder
    vq_model: str = "VQ-16"
    tensorrt: object | None = None  # an export.tensorrt.TrtBuildConfig: also build plans


def build(source: ModelSource, out: str | Path, options: BuildOptions | None = None, *,
          force: bool = False, log: Log | None = None, **option_fields: object) -> Artifact:
    """Export `source` into the artifact directory `out` (nothing is left there on failure).

    Options come as a BuildOptions or as its fields: build(source, "art/", weights="int8")."""
    options = replace(options or BuildOptions(), **option_fields)
    log = log or (lambda line: None)
    if options.tensorrt is not None and options.attention == "gqa":
        raise UserError("--attention gqa is ONNX Runtime's own op, which TensorRT cannot parse; "
                        "drop --attention (math is the default with --tensorrt).")
    if options.tensorrt is not None and options.weights == "w8a8":
        # int8/int4 go to TensorRT as DequantizeLinear -> MatMul (export/quantize.py); w8a8's
        # MatMulInteger has no TensorRT form.
        raise UserError("--weights w8a8 makes ONNX Runtime's own integer MatMuls, which "
                        "TensorRT cannot parse; use --weights int8 or int4 with --tensorrt "
                        "(weight-only), or build w8a8 without --tensorrt for ONNX Runtime.")
    attention = options.attention or ("math" if options.tensorrt is not None else "gqa")
    options = replace(options, attention=attention)
    out = Path(out)
    if options.tensorrt is None:
        return _export(source, out, options, force, log)
    from ..export.tensorrt import build_with_plans

    build_with_plans(lambda path: _export(source, path, options, False, log), out, force,
                     options.tensorrt, log)
    return load_artifact(out, check_hashes=False)  # just hashed while building


def _check(source: ModelSource, out: Path, options: BuildOptions, force: bool) -> None:
    """Everything that needs no weights, before minutes of loading and export."""
    family = source.family
    check_family(family, source.checkpoint)
    if options.head_budgets is not None and family != "llamagen":
        raise UserError(f"--head-budgets run on LlamaGen class-to-image models for now, not "
                        f"--family {family}; drop it.")
    if family in ("llamagen", "llamagen-t2i") and source.checkpoint is None \
            and not source.random_weights:
        kind = "c2i" if family == "llamagen" else "t2i"
        raise UserError(f"No weights given; pass --checkpoint PATH (a LlamaGen {kind} GPT) or "
                        "--random-weights.")
    if family in HF_FAMILIES and source.checkpoint is None:
        raise UserError(f"--family {family} needs --checkpoint DIR, a local Hugging Face model "
                        "directory (nothing is downloaded).")
    if source.dtype not in ARTIFACT_DTYPES:
        raise UserError(f"Artifacts are built in {' or '.join(ARTIFACT_DTYPES)}, not "
                        f"{source.dtype}; ONNX Runtime's CPU provider has no bf16 kernels for "
                        "this graph.")
    if options.opset < 18:
        raise UserError(f"--opset {options.opset} is too old; the step graph needs opset 18 or "
                        "newer.")
    if out.exists() and not force:
        raise UserError(f"Artifact directory '{out}' already exists; pass --force to replace it "
                        "or choose another --out.")
    if options.vq_checkpoint is not None and family not in ("llamagen", "lumina"):
        raise UserError(f"--vq-checkpoint exports LlamaGen's or Chameleon's VQ decoder; "
                        f"--family {family} decodes with its own tokenizer, which artifacts "
                        "do not hold yet.")
    if family == "llamagen":  # a bad budget or budgets file fails before the weights load
        _policy(options, get_config(source.model),
                SequenceLayout.for_image(get_config(source.model), source.image_size))


def _policy(options: BuildOptions, config: GPTConfig, layout: SequenceLayout) -> Policy:
    """The policy the artifact's cache is sized for (and its graphs: slot_positions or not)."""
    head_budgets = {} if options.head_budgets is None else {
        "head_budgets": options.head_budgets, "model_config": config}
    return layout_policy(layout, options.policy, options.budget, **head_budgets)


def _weights_record(source: ModelSource, stage: Log) -> dict:
    """How verify rebuilds the reference: the checkpoint's hash, or the random init's seed."""
    if source.checkpoint is not None:
        what = "model directory" if source.family in HF_FAMILIES else "checkpoint"
        stage(f"hashing the {what} (recorded so verify can rebuild the reference)")
    return weights_record(source.family, source.checkpoint, source.seed)


def _export(source: ModelSource, out: Path, options: BuildOptions, force: bool,
            log: Log, policy: Policy | None = None) -> Artifact:
    """`policy`: what the cache is sized for, in place of options.policy, budget and
    head_budgets (the per-user cache builds for a policy it was given)."""
    _check(source, out, options, force)
    started = time.perf_counter()

    def stage(line: str) -> None:
        log(f"[{time.perf_counter() - started:7.1f} s] {line}")

    stage(f"loading {source.family} weights from {source.checkpoint or 'a seeded random init'}")
    model = load_step_model(source.family, checkpoint=source.checkpoint,
                            model_name=source.model, image_size=source.image_size,
                            dtype=source.dtype, seed=source.seed,
                            max_prompt_tokens=source.max_prompt_tokens)
    weights = _weights_record(source, stage)
    model_name = (Path(source.checkpoint).resolve().name if source.family in HF_FAMILIES
                  else source.model)
    chosen = policy or _policy(options, model.config, model.family.token_layout(model.layout))
    vq_decoder = None
    if options.vq_checkpoint is not None:
        vq_model = CHAMELEON_VQ if source.family == "lumina" else options.vq_model
        stage(f"loading the {vq_model} decoder from {options.vq_checkpoint}")
        vq_decoder = (load_vq_decoder(options.vq_checkpoint, vq_model, model.config),
                      {"model": vq_model, "path": str(Path(options.vq_checkpoint).resolve()),
                       "sha256": sha256_file(Path(options.vq_checkpoint))})
    build_options = {"policy": chosen.name,
                     "budget": None if chosen.name == "full" else options.budget,
                     "budget_tokens": chosen.budget}
    if options.head_budgets is not None:
        build_options["head_budgets"] = str(Path(options.head_budgets).resolve())
    artifact = build_artifact(
        model, out, model_name=model_name, image_size=source.image_size, weights=weights,
        capacity=chosen.capacity, build_options=build_options, max_batch=options.max_batch,
        opset=options.opset, split_cache=options.cache_inputs == "per-layer",
        attention=options.attention, weight_format=options.weights,
        head_shared=chosen.head_shared, force=force, log=stage, vq_decoder=vq_decoder,
    )
    stage("done")
    return artifact


def cache_root() -> Path:
    """Per-user artifact cache: $LINEAR_EXPORT_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("LINEAR_EXPORT_CACHE"):
        return Path(os.environ["LINEAR_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linear-export"


def cached_artifact(source: ModelSource, policy: Policy, rows: int,
                    log: Log | None = None) -> Artifact:
    """The artifact for these weights and options, built into the per-user cache once."""
    log = log or (lambda line: None)
    if source.checkpoint is not None:
        if not Path(source.checkpoint).is_file():
            raise UserError(f"Checkpoint '{source.checkpoint}' does not exist; pass the path of "
                            "a .pt or .safetensors file.")
        weights = f"sha256:{sha256_file(Path(source.checkpoint))}"
    else:
        weights = f"random:{source.seed}:{random_std()}"
    max_batch = max(64, rows)
    key = {"weights": weights, "model": source.model, "image_size": source.image_size,
           "dtype": source.dtype, "capacity": policy.capacity, "max_batch": max_batch,
           "opset": DEFAULT_OPSET, "cache_inputs": "per-layer", "tools": tool_versions()}
    if policy.head_shared:
        key["head_shared"] = True
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    out = cache_root() / digest
    with _exclusive(out.with_name(f".{out.name}.lock")):  # runs at once: one builds, others wait
        if (out / "manifest.json").is_file():
            try:
                return load_artifact(out)
            except UserError as error:
                log(f"Rebuilding the cached artifact {out}: {error}")
        log(f"Building an ort artifact for {source.model} ({policy.capacity} cache slots) into "
            f"{out}; later runs reuse it.")
        budget = str(policy.budget) if policy.name != "full" else "1/4"
        # Nobody sees this graph: the faster, copy-free per-layer form, sized for `policy`
        # (with per-head budgets, for its table).
        options = BuildOptions(policy=policy.name, budget=budget, max_batch=max_batch,
                               attention="gqa")
        return _export(replace(source, random_weights=source.checkpoint is None), out, options,
                       True, log, policy)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """An exclusive lock on `lock` (created if need be), released however the block ends."""
    with clear_write_errors(lock.parent):
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 - held open for the lock's lifetime
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
