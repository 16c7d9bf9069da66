"""`linear-export build`: export the decode step into an artifact directory."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import click

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
from ..export.quantize import WEIGHT_FORMATS
from ..models import GPT_CONFIGS, SequenceLayout, get_config, init_weights
from ..models.attention import ATTENTION_KERNELS
from ..models.families import (
    FAMILIES,
    HF_FAMILIES,
    check_family,
    hf_weights_record,
    load_step_model,
)
from ..outputs import clear_write_errors
from ..runtime.budget import BUDGET_HELP
from ..runtime.policies import POLICIES, Policy
from .options import build_policy

RANDOM_STD = inspect.signature(init_weights).parameters["std"].default  # as load_gpt


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.iterdir() if file.is_file())


def build_from_options(
    *, checkpoint: str | None, random_weights: bool, model_name: str, image_size: int,
    dtype: str, policy: str, budget: str, max_batch: int, out: Path,
    force: bool, seed: int = 0, opset: int = DEFAULT_OPSET, split_cache: bool = False,
    echo=lambda line: None, vq_checkpoint: str | None = None, vq_model: str = "VQ-16",
    family: str = "llamagen", max_prompt_tokens: int = 128, head_shared: bool = False,
    attention: str = "gqa", weight_format: str = "fp32",
):
    """Validate, load the weights, export: shared by `build` and `generate --engine ort`."""
    check_family(family, checkpoint)
    if head_shared and family != "llamagen":
        raise UserError(f"--head-shared serves per-head budgets, which run on LlamaGen "
                        f"class-to-image models for now, not --family {family}; drop it.")
    if family in ("llamagen", "llamagen-t2i") and checkpoint is None and not random_weights:
        kind = "c2i" if family == "llamagen" else "t2i"
        raise UserError(f"No weights given; pass --checkpoint PATH (a LlamaGen {kind} GPT) or "
                        "--random-weights.")
    if family in HF_FAMILIES and checkpoint is None:
        raise UserError(f"--family {family} needs --checkpoint DIR, a local Hugging Face model "
                        "directory (nothing is downloaded).")
    if dtype not in ARTIFACT_DTYPES:
        raise UserError(f"Artifacts are built in {' or '.join(ARTIFACT_DTYPES)}, not {dtype}; "
                        "ONNX Runtime's CPU provider has no bf16 kernels for this graph.")
    if opset < 18:
        raise UserError(f"--opset {opset} is too old; the step graph needs opset 18 or newer.")
    if out.exists() and not force:
        raise UserError(f"Artifact directory '{out}' already exists; pass --force to replace it "
                        "or choose another --out.")
    if family == "llamagen":  # a bad budget fails before the weights load
        config = get_config(model_name)
        build_policy(SequenceLayout.for_image(config, image_size), policy, budget)
    started = time.perf_counter()

    def stage(line: str) -> None:
        echo(f"[{time.perf_counter() - started:7.1f} s] {line}")

    stage(f"loading {family} weights from {checkpoint or 'a seeded random init'}")
    model = load_step_model(family, checkpoint=checkpoint, model_name=model_name,
                            image_size=image_size, dtype=dtype, seed=seed,
                            max_prompt_tokens=max_prompt_tokens)
    if family in HF_FAMILIES:
        model_name = Path(checkpoint).resolve().name
        stage("hashing the model directory (recorded so verify can rebuild the reference)")
        weights = hf_weights_record(family, checkpoint)
    else:
        if checkpoint is not None:
            stage("hashing the checkpoint (recorded so verify can rebuild the reference)")
            weights = {"source": "checkpoint", "path": str(Path(checkpoint).resolve()),
                       "sha256": sha256_file(Path(checkpoint))}
        else:
            weights = {"source": "random", "seed": seed, "std": RANDOM_STD}
    chosen = build_policy(model.family.token_layout(model.layout), policy, budget)
    vq_decoder = None
    if vq_checkpoint is not None:
        if family not in ("llamagen", "lumina"):
            raise UserError(f"--vq-checkpoint exports LlamaGen's or Chameleon's VQ decoder; "
                            f"--family {family} decodes with its own tokenizer, which artifacts "
                            "do not hold yet.")
        from .generate import CHAMELEON_VQ, load_decoder  # generate imports this module

        vq_model = CHAMELEON_VQ if family == "lumina" else vq_model
        stage(f"loading the {vq_model} decoder from {vq_checkpoint}")
        vq_decoder = (load_decoder(vq_checkpoint, vq_model, model.config),
                      {"model": vq_model, "path": str(Path(vq_checkpoint).resolve()),
                       "sha256": sha256_file(Path(vq_checkpoint))})
    options = {"policy": chosen.name, "budget": None if chosen.name == "full" else budget,
               "budget_tokens": chosen.budget}
    artifact = build_artifact(
        model, out, model_name=model_name, image_size=image_size, weights=weights,
        capacity=chosen.capacity, build_options=options, max_batch=max_batch,
        opset=opset, split_cache=split_cache, attention=attention, weight_format=weight_format,
        head_shared=head_shared, force=force, log=stage, vq_decoder=vq_decoder,
    )
    stage("done")
    return artifact


@click.command()
@click.option("--checkpoint", type=click.Path(), default=None,
              help="LlamaGen GPT checkpoint (.pt or .safetensors; omit with --random-weights), "
                   "or for janus/lumina a local Hugging Face model directory.")
@click.option("--family", default="llamagen", show_default=True,
              help=f"Model family: {', '.join(FAMILIES)}. llamagen-t2i artifacts add a "
                   "prefill graph that takes caption features, and the uncond embedding.")
@click.option("--max-prompt-tokens", type=int, default=128, show_default=True,
              help="janus/lumina: the prefix capacity (prompt tokens per row).")
@click.option("--random-weights", is_flag=True,
              help="Seeded random weights instead of a checkpoint (benchmarks, tests).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights.")
@click.option("--model", "model_name", default="GPT-B", show_default=True,
              help=f"Model config: {', '.join(GPT_CONFIGS)}.")
@click.option("--image-size", type=int, default=256, show_default=True,
              help="Image side in pixels (grid = image size / the tokenizer's stride).")
@click.option("--dtype", type=click.Choice(ARTIFACT_DTYPES), default="fp32", show_default=True,
              help="Graph and cache precision.")
@click.option("--policy", default="linear", show_default=True,
              help=f"Policy the cache capacity is sized for: {', '.join(POLICIES)} "
                   "(full: prefix + whole image).")
@click.option("--budget", default="1/4", show_default=True, help=f"Cache budget: {BUDGET_HELP}.")
@click.option("--max-batch", type=int, default=64, show_default=True,
              help="Most rows per step (CFG doubles the rows).")
@click.option("--attention", type=click.Choice(ATTENTION_KERNELS), default=None,
              help="The decode step's attention: gqa, ONNX Runtime's fused GroupQueryAttention "
                   "(reads the bound cache and writes the step's keys into it in place; needs "
                   "per-layer cache inputs and no --head-shared), or math, standard ONNX ops "
                   "(what TensorRT parses). [default: gqa, math with --tensorrt]")
@click.option("--weights", "weight_format", type=click.Choice(WEIGHT_FORMATS), default="fp32",
              show_default=True,
              help="Weight-only precision of the graphs' MatMuls: fp32 keeps --dtype; int8 or "
                   "int4 use ONNX Runtime's MatMulNBits (block 32, int8 compute on "
                   "VNNI/AMX CPUs). Quality and speed of each: docs/speed.md.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset.")
@click.option("--cache-inputs", type=click.Choice(["stacked", "per-layer"]), default="per-layer",
              show_default=True,
              help="stacked: past_key/past_value [L, B, Hkv, C, D], the contract's form; "
                   "per-layer: past_key.0 ... [B, Hkv, C, D], bound in place without the "
                   "per-step cache copy ONNX Runtime's Gather makes (faster on CPU).")
@click.option("--head-shared", is_flag=True,
              help="The step also takes slot_owner, so a layer's kv heads can share its cache "
                   "slots: what per-head budgets (generate --head-budgets) need. Attention "
                   "then reads every head's slots, masked to its own.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Artifact directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing artifact (once the new one is "
                                            "complete).")
@click.option("--vq-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Also export this VQ tokenizer's decoder (vq_decoder.onnx; for --family "
                   "lumina Chameleon's vqgan.ckpt); generate "
                   "--engine ort then decodes images with ONNX Runtime.")
@click.option("--vq-model", default="VQ-16", show_default=True, help="VQ tokenizer config.")
@click.option("--tensorrt", is_flag=True,
              help="Also build TensorRT plans (NVIDIA GPU and the tensorrt package needed); "
                   "precision is the graph's --dtype (strongly typed).")
@click.option("--trt-opt-batch", type=int, default=None,
              help="Rows TensorRT tunes its kernels for [default: min(16, --max-batch)].")
@click.option("--trt-workspace", type=float, default=4.0, show_default=True,
              help="TensorRT builder workspace limit in GiB.")
@click.option("--trt-tf32", is_flag=True,
              help="Let fp32 plans use TF32 (faster; beyond verify's fp32 tolerances).")
@click.option("--trt-timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file shared across builds [default: one inside the artifact].")
def build(checkpoint, family, max_prompt_tokens, random_weights, seed, model_name, image_size,
          dtype, policy, budget, max_batch, attention, weight_format, opset, cache_inputs,
          head_shared, out,
          force, tensorrt, trt_opt_batch, trt_workspace, trt_tf32, trt_timing_cache,
          vq_checkpoint, vq_model) -> None:
    """Export the decode step to ONNX: an artifact directory for the ort engine and verify.

    Example: linear-export build --checkpoint c2i_B_256.pt --model GPT-B --policy linear
    --budget 1/4 --out artifacts/gpt-b-linear

    Janus-Pro / Lumina-mGPT: linear-export build --family janus --checkpoint Janus-Pro-1B/
    --image-size 384 --out artifacts/janus
    """
    started = time.perf_counter()
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    if tensorrt and attention == "gqa":
        raise UserError("--attention gqa is ONNX Runtime's own op, which TensorRT cannot parse; "
                        "drop --attention (math is the default with --tensorrt).")
    attention = attention or ("math" if tensorrt else "gqa")
    export = functools.partial(
        build_from_options,
        checkpoint=checkpoint, random_weights=random_weights, model_name=model_name,
        image_size=image_size, dtype=dtype, policy=policy, budget=budget, max_batch=max_batch,
        attention=attention, weight_format=weight_format, seed=seed, opset=opset,
        split_cache=cache_inputs == "per-layer", echo=echo, vq_checkpoint=vq_checkpoint,
        vq_model=vq_model, family=family, max_prompt_tokens=max_prompt_tokens,
        head_shared=head_shared,
    )
    if tensorrt:
        from ..export.tensorrt import GiB, TrtBuildConfig, build_with_plans, default_opt_batch

        trt_config = TrtBuildConfig(
            max_batch=max_batch, opt_batch=trt_opt_batch or default_opt_batch(max_batch),
            workspace_bytes=int(trt_workspace * GiB), tf32=trt_tf32,
            timing_cache=trt_timing_cache)
        build_with_plans(lambda path: export(out=path, force=False), out, force, trt_config, echo)
        artifact = load_artifact(out, check_hashes=False)  # just hashed while building
    else:
        artifact = export(out=out, force=force)
    manifest = artifact.manifest
    size = directory_bytes(artifact.path)
    click.echo(
        f"Built {artifact.path}: {manifest['model']['family']} {manifest['model']['name']} "
        f"{image_size}px {dtype}, capacity "
        f"{artifact.capacity} slots ({manifest['build']['policy']}, "
        f"{manifest['build']['cache_inputs']} cache inputs"
        f"{', head-shared pool' if artifact.head_shared else ''}), export "
        f"{manifest['build']['export_seconds']:.1f} s (total {time.perf_counter() - started:.1f}"
        f" s), {size / 2**20:.1f} MiB."
    )
    if "tensorrt" in manifest:
        record = manifest["tensorrt"]
        click.echo(f"TensorRT {record['version']} plans for {record['gpu']}: "
                   f"{', '.join(record['plans'].values())} ({record['build_seconds']:.1f} s).")


def cache_root() -> Path:
    """Per-user artifact cache: $LINEAR_EXPORT_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("LINEAR_EXPORT_CACHE"):
        return Path(os.environ["LINEAR_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linear-export"


def cached_artifact(
    *, checkpoint: str | None, model_name: str, image_size: int, dtype: str, seed: int,
    policy: Policy, rows: int, echo=lambda line: None,
) -> Artifact:
    """The artifact for these weights and options, built into the per-user cache once."""
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"Checkpoint '{checkpoint}' does not exist; pass the path of a .pt "
                            "or .safetensors file.")
        weights = f"sha256:{sha256_file(Path(checkpoint))}"
    else:
        weights = f"random:{seed}:{RANDOM_STD}"
    max_batch = max(64, rows)
    key = {"weights": weights, "model": model_name, "image_size": image_size, "dtype": dtype,
           "capacity": policy.capacity, "max_batch": max_batch, "opset": DEFAULT_OPSET,
           "cache_inputs": "per-layer", "tools": tool_versions()}
    if policy.head_shared:
        key["head_shared"] = True
    key = json.dumps(key, sort_keys=True)
    out = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:20]
    with _exclusive(out.with_name(f".{out.name}.lock")):  # runs at once: one builds, others wait
        if (out / "manifest.json").is_file():
            try:
                return load_artifact(out)
            except UserError as error:
                echo(f"Rebuilding the cached artifact {out}: {error}")
        echo(f"Building an ort artifact for {model_name} ({policy.capacity} cache slots) into "
             f"{out}; later runs reuse it.")
        budget = str(policy.budget) if policy.name != "full" else "1/4"
        return build_from_options(
            checkpoint=checkpoint, random_weights=checkpoint is None, model_name=model_name,
            image_size=image_size, dtype=dtype, policy=policy.name, budget=budget,
            max_batch=max_batch, out=out, force=True, seed=seed,
            split_cache=True, echo=echo,  # nobody sees this graph: the faster, copy-free form
            head_shared=policy.head_shared,
        )


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
