"""`linear-export generate`: images (or token grids) from class ids or prompts, with a policy."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .. import api
from ..engines import ENGINES
from ..errors import UserError
from ..models.families import FAMILIES
from ..outputs import check_writable, write_directory, write_json, write_npy
from ..runtime.sampling import SamplingConfig
from .options import model_options, policy_options, sampling_options

DEMO_CLASSES = ",".join(str(c) for c in range(10))


def given(name: str) -> bool:
    """Whether the user set option `name` (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


@click.command()
@model_options
@policy_options
@click.option("--classes", default="207,360,387,974,88,979,417,279", show_default=True,
              help="Comma-separated class ids, cycled to fill --num-images.")
@click.option("--num-images", type=int, default=None,
              help="Images to generate [default: one per class].")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Images per engine batch (CFG doubles the rows).")
@sampling_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for weights and sampling.")
@click.option("--engine", "engine_name", type=click.Choice(ENGINES), default="torch",
              show_default=True, help="Engine that runs the decode step.")
@click.option("--artifact", "artifact_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="ort: a built artifact directory [default: build one from "
                                 "--checkpoint/--random-weights into ~/.cache/linear-export].")
@click.option("--save-tokens", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the token grids [N, h, w] to this .npy file.")
@click.option("--stats-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write timing and memory stats to this JSON file.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory: one PNG per image, grid.png, tokens.npy, stats.json.")
@click.option("--vq-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="VQ tokenizer checkpoint that decodes tokens into images: LlamaGen's, or "
                   "for --family lumina Chameleon's vqgan.ckpt.")
@click.option("--vq-model", default="VQ-16", show_default=True, help="VQ tokenizer config.")
@click.option("--no-decode", is_flag=True, help="Write tokens and stats only, no images.")
@click.option("--cuda-graph", is_flag=True,
              help="torch engine on CUDA: replay each decode step from a CUDA graph.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--family", default="llamagen", show_default=True,
              help=f"Model family: {', '.join(FAMILIES)} (all but llamagen: torch engine, "
                   "token grids only).")
@click.option("--prompt", "prompts", multiple=True,
              help="janus/lumina: a text prompt (repeatable), tokenized with the model's own "
                   "tokenizer from --checkpoint DIR.")
@click.option("--caption-features", multiple=True, type=click.Path(dir_okay=False),
              help="llamagen-t2i: T5 caption features per prompt (.npy [tokens, 2048], or "
                   ".safetensors with caption and mask).")
@click.option("--max-prompt-tokens", type=int, default=128, show_default=True,
              help="janus/lumina: the prefix capacity (prompt tokens per row).")
def generate(
    checkpoint, model_name, random_weights, image_size, dtype, device, policy, budget,
    classes, num_images, batch_size, cfg_scale, temperature, top_k, top_p, seed, engine_name,
    artifact_dir, save_tokens, stats_json, out, vq_checkpoint, vq_model, no_decode, force,
    cuda_graph, family, prompts, caption_features, max_prompt_tokens, **knobs,
) -> None:
    """Generate images with a fixed-capacity KV cache: class-conditional, or from prompts.

    With no --checkpoint, --random-weights or --artifact, the bundled demo model runs
    (64 px, 10 procedural classes): `linear-export generate --out samples/`.

    Example: linear-export generate --checkpoint c2i_B_256.pt --model GPT-B --policy linear
    --budget 1/4 --classes 207,360 --out samples/
    """
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images {num_images} must be at least 1.")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1.")
    for path in (save_tokens, stats_json, out):
        if path is not None:
            check_writable(path, force)
    source = api.ModelSource(family, checkpoint, model_name, image_size, dtype, device, seed,
                             random_weights, max_prompt_tokens)
    if source.demo and artifact_dir is None:
        source = api.demo_source(source, model_given=given("model_name"),
                                 image_size_given=given("image_size"))
        classes = classes if given("classes") else DEMO_CLASSES
    if cfg_scale is None:
        cfg_scale = api.default_cfg_scale(source, artifact_dir)
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p)
    engine, chosen = open_engine_and_policy(source, engine_name, artifact_dir, policy, budget,
                                            knobs, rows=batch_size * (1 + sampling.uses_cfg),
                                            cuda_graph=cuda_graph)
    decoder = None
    if not no_decode and (out is not None or vq_checkpoint is not None):
        decoder = api.load_decoder(engine, vq_checkpoint, vq_model)  # fails before generating
    conditions = conditions_of(engine, source, classes, prompts, caption_features)
    total = num_images or len(conditions)
    conditions = [conditions[i % len(conditions)] for i in range(total)]
    result = api.generate(engine, conditions, chosen, sampling, batch_size=batch_size,
                          seed=seed, decoder=decoder if out is not None else None,
                          progress=sys.stderr.isatty())
    if save_tokens is not None:
        write_npy(save_tokens, result.tokens)
    if stats_json is not None:
        write_json(stats_json, result.stats)
    if out is not None:
        write_directory(out, result.files(), force)
    click.echo(summary(result, engine.family.name, decoder is not None, out is not None,
                       no_decode))


def open_engine_and_policy(source, engine_name: str, artifact_dir: Path | None, policy: str,
                           budget: str, knobs: dict, rows: int, cuda_graph: bool):
    """The engine (on the weights, or on --artifact) and the policy, checked in that order
    that fails fastest: a LlamaGen policy before its weights load."""
    if source.family != "llamagen" and knobs.get("head_budgets") is not None:
        raise UserError(f"--head-budgets runs on LlamaGen class-to-image models for now, not "
                        f"--family {source.family}; drop it.")
    if artifact_dir is not None:
        artifact = api.load_artifact_for(
            artifact_dir, engine_name,
            weights_given=source.checkpoint is not None or source.random_weights,
            family=source.family, model=source.model if given("model_name") else None,
            image_size=source.image_size if given("image_size") else None,
            dtype=source.dtype if given("dtype") else None)
        engine = api.open_engine(artifact, engine_name, device=source.device)
        return engine, api.make_policy(policy, engine, budget=budget, **knobs)
    if source.family == "llamagen":
        chosen = api.make_policy(policy, source, budget=budget, **knobs)
        engine = api.open_source(source, engine_name, policy=chosen, rows=rows,
                                 device=source.device, cuda_graph=cuda_graph,
                                 log=lambda line: click.echo(line, err=True))
        return engine, api.fit_engine(chosen, engine)
    engine = api.open_source(source, engine_name, device=source.device, cuda_graph=cuda_graph)
    return engine, api.make_policy(policy, engine, budget=budget, **knobs)


def conditions_of(engine, source, classes: str, prompts, caption_features) -> list:
    """Class ids for LlamaGen class-to-image models, the prompts' conditions otherwise."""
    if engine.family.name == "llamagen":
        return api.parse_classes(classes, engine.config.num_classes)
    checkpoint = api.model_directory(engine)
    return api.prompt_conditions(engine, prompts, caption_features, checkpoint)


def summary(result, family: str, decoded: bool, wrote: bool, no_decode: bool) -> str:
    """The one line `generate` prints (and a note when images were asked for but not made)."""
    stats = result.stats
    if family != "llamagen":
        written = "images and token grids" if decoded else (
            "token grids written; pass --vq-checkpoint (Chameleon's vqgan.ckpt) for images"
            if family == "lumina" else "token grids written; decode them with the family's "
            "own VQ decoder")
        return (f"{stats['images']} images ({family}), {stats['policy']} policy, capacity "
                f"{stats['kv_capacity']} slots: {written}.")
    if wrote and not decoded and not no_decode:
        click.echo("No --vq-checkpoint given: wrote tokens and stats, no images.", err=True)
    return (f"{stats['images']} images, {stats['policy']} policy, budget {stats['budget']} "
            f"tokens, capacity {stats['kv_capacity']} slots: {stats['images_per_s']:.3f} "
            f"images/s, KV {stats['kv_bytes'] / 2**20:.1f} MiB (full "
            f"{stats['full_kv_bytes'] / 2**20:.1f} MiB)")
