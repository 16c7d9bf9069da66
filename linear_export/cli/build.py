"""`linear-export build`: export the decode step into an artifact directory."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .. import api
from ..export.artifact import ARTIFACT_DTYPES
from ..export.onnx_step import DEFAULT_OPSET
from ..export.quantize import WEIGHT_FORMATS
from ..models import GPT_CONFIGS
from ..models.families import FAMILIES
from ..models.kernels import KERNELS
from ..runtime.budget import BUDGET_HELP
from ..runtime.policies import POLICIES


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.iterdir() if file.is_file())


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
@click.option("--attention", type=click.Choice(KERNELS), default=None,
              help="The decode step's kernels: gqa, ONNX Runtime's fused ops "
                   "(GroupQueryAttention, which reads the bound cache and writes the step's "
                   "keys into it in place, needs per-layer cache inputs; RotaryEmbedding; "
                   "SkipSimplifiedLayerNormalization), or math, standard ONNX ops "
                   "(what TensorRT parses). [default: gqa, math with --tensorrt]")
@click.option("--weights", "weight_format", type=click.Choice(WEIGHT_FORMATS), default="fp32",
              show_default=True,
              help="Precision of the graphs' weight MatMuls: fp32 keeps --dtype; int8 or "
                   "int4 are weight-only, symmetric blocks of 32: ONNX Runtime's MatMulNBits "
                   "(int8 compute on VNNI CPUs), or with --attention math / --tensorrt "
                   "DequantizeLinear -> MatMul, standard ONNX that TensorRT builds into "
                   "weight-only GEMMs; w8a8 is ONNX Runtime's dynamic quantization (7-bit "
                   "weights per channel, activations quantized per step; the fastest on VNNI "
                   "CPUs; not with --tensorrt). Quality and speed of each: docs/speed.md.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset.")
@click.option("--cache-inputs", type=click.Choice(["stacked", "per-layer"]), default="per-layer",
              show_default=True,
              help="stacked: past_key/past_value [L, B, Hkv, C, D], the contract's form; "
                   "per-layer: past_key.0 ... [B, Hkv, C, D], bound in place without the "
                   "per-step cache copy ONNX Runtime's Gather makes (faster on CPU).")
@click.option("--head-budgets", type=click.Path(dir_okay=False), default=None,
              help="A per-head budgets file (linear-export calibrate) to run with generate "
                   "--head-budgets: the step also takes slot_positions, which mark the dead "
                   "slots of kv heads that keep fewer, and the cache holds the largest count "
                   "the file's table gives a head at --budget (more memory than the uniform "
                   "budget).")
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
          head_budgets, out,
          force, tensorrt, trt_opt_batch, trt_workspace, trt_tf32, trt_timing_cache,
          vq_checkpoint, vq_model) -> None:
    """Export the decode step to ONNX: an artifact directory for the ort engine and verify.

    Example: linear-export build --checkpoint c2i_B_256.pt --model GPT-B --policy linear
    --budget 1/4 --out artifacts/gpt-b-linear

    Janus-Pro / Lumina-mGPT: linear-export build --family janus --checkpoint Janus-Pro-1B/
    --image-size 384 --out artifacts/janus
    """
    started = time.perf_counter()
    trt_config = None
    if tensorrt:
        from ..export.tensorrt import GiB, TrtBuildConfig, default_opt_batch

        trt_config = TrtBuildConfig(
            max_batch=max_batch, opt_batch=trt_opt_batch or default_opt_batch(max_batch),
            workspace_bytes=int(trt_workspace * GiB), tf32=trt_tf32,
            timing_cache=trt_timing_cache)
    source = api.ModelSource(family, checkpoint, model_name, image_size, dtype, seed=seed,
                             random_weights=random_weights, max_prompt_tokens=max_prompt_tokens)
    options = api.BuildOptions(
        policy=policy, budget=budget, max_batch=max_batch, attention=attention,
        weights=weight_format, opset=opset, cache_inputs=cache_inputs, head_budgets=head_budgets,
        vq_checkpoint=vq_checkpoint, vq_model=vq_model, tensorrt=trt_config)
    artifact = api.build(source, out, options, force=force,
                         log=lambda line: click.echo(line, err=True))
    manifest = artifact.manifest
    size = directory_bytes(artifact.path)
    click.echo(
        f"Built {artifact.path}: {manifest['model']['family']} {manifest['model']['name']} "
        f"{image_size}px {dtype}, capacity "
        f"{artifact.capacity} slots ({manifest['build']['policy']}, "
        f"{manifest['build']['cache_inputs']} cache inputs"
        f"{', per-head budgets' if artifact.head_shared else ''}), export "
        f"{manifest['build']['export_seconds']:.1f} s (total {time.perf_counter() - started:.1f}"
        f" s), {size / 2**20:.1f} MiB."
    )
    if "tensorrt" in manifest:
        record = manifest["tensorrt"]
        click.echo(f"TensorRT {record['version']} plans for {record['gpu']}: "
                   f"{', '.join(record['plans'].values())} ({record['build_seconds']:.1f} s).")
