"""`linear-export sample`: evaluation-scale sampling (PNG shards, ADM .npz), in-process or Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .. import api
from ..api.sample import DEFAULT_SHARD_SIZE, SampleSpec
from ..api.sample_run import sample as run_sample
from ..engines import ENGINES
from .options import model_options, policy_options, sampling_options


@click.command()
@model_options
@policy_options
@click.option("--family", default="llamagen", show_default=True,
              help="Model family (llamagen class-conditional only for now).")
@click.option("--engine", "engine_name", type=click.Choice(ENGINES),
              default="torch", show_default=True, help="Engine that runs the decode step.")
@click.option("--artifact", "artifact_dir", type=click.Path(file_okay=False), default=None,
              help="ort/tensorrt: a built artifact directory [default for ort: build one from "
                   "the weights into ~/.cache/linear-export].")
@click.option("--classes", default=None,
              help="Comma-separated class ids [default: all the model's classes].")
@click.option("--per-class", type=int, default=50, show_default=True,
              help="Samples per class (ADM: 50 x 1000 classes = 50k).")
@click.option("--num-samples", type=int, default=None,
              help="Total samples, classes round-robin [default: --per-class x classes].")
@sampling_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="Base seed: sample i draws with seed * 1000003 + i (and random weights).")
@click.option("--vq-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="VQ tokenizer checkpoint that decodes tokens into images.")
@click.option("--vq-model", default="VQ-16", show_default=True, help="VQ tokenizer config.")
@click.option("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Samples per shard; a shard is one engine batch (CFG doubles the rows).")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Ray actors, one engine each; 0 runs in this process without Ray.")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster ('auto', 'ray://host:10001') [default: a local Ray].")
@click.option("--num-gpus-per-worker", type=float, default=0, show_default=True,
              help="GPUs per Ray actor (1 = one engine per GPU); use with --device cuda.")
@click.option("--cpu-threads", type=int, default=1, show_default=True,
              help="Intra-op threads per worker (CPU numerics depend on it, so a rerun must "
                   "keep it to resume).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: shards/, samples.npz, manifest.json; rerun to resume.")
@click.option("--force", is_flag=True, help="Discard what --out holds and start again.")
def sample(
    checkpoint, model_name, random_weights, image_size, dtype, device, policy, budget, family,
    engine_name, artifact_dir, classes, per_class, num_samples, cfg_scale, temperature, top_k,
    top_p, seed, vq_checkpoint, vq_model, shard_size, workers, ray_address,
    num_gpus_per_worker, cpu_threads, out, force, head_budgets, **knobs,
) -> None:
    """Sample N images (PNG shards and ADM's samples.npz) through any engine and policy.

    With no --checkpoint, --random-weights or --artifact the bundled demo model runs:
    `linear-export sample --num-samples 40 --out runs/demo`. A rerun with the same options
    skips the finished shards. On a cluster: --ray-address auto --workers 8
    --num-gpus-per-worker 1 --device cuda.
    """
    context = click.get_current_context()

    def given(name: str):
        value = context.params[name]
        return value if context.get_parameter_source(name) != ParameterSource.DEFAULT else None

    policy_knobs = {key: value for key, value in knobs.items()
                    if context.get_parameter_source(key) != ParameterSource.DEFAULT}
    if head_budgets is not None:
        policy_knobs["head_budgets"] = str(Path(head_budgets).resolve())
    class_ids = () if classes is None else tuple(api.parse_classes(classes))
    spec = SampleSpec(
        checkpoint=checkpoint, model_name=given("model_name"), image_size=given("image_size"),
        dtype=dtype, random_weights=random_weights, weights_seed=seed, family=family,
        engine=engine_name, artifact=artifact_dir, device=device, policy=policy, budget=budget,
        policy_knobs=policy_knobs, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
        top_p=top_p, vq_checkpoint=vq_checkpoint, vq_model=vq_model, classes=class_ids,
        per_class=per_class, num_samples=num_samples, seed=seed, cpu_threads=cpu_threads)
    summary = run_sample(spec, out, workers=workers, ray_address=ray_address,
                         num_gpus_per_worker=num_gpus_per_worker, shard_size=shard_size,
                         force=force, progress=sys.stderr.isatty())
    click.echo(summary.line())
