"""`linear-export generate`: class-conditional images (for now their token grids) with a policy."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import click
import numpy as np
import torch

from ..engines import ENGINES, make_engine
from ..errors import UserError
from ..export.artifact import load_artifact
from ..models import GPTConfig, SequenceLayout, get_config, load_gpt
from ..models.chameleon_vq import NAME as CHAMELEON_VQ
from ..models.families import FAMILIES, check_family
from ..models.vq import load_vq
from ..outputs import (
    check_writable,
    json_bytes,
    npy_bytes,
    write_directory,
    write_json,
    write_npy,
)
from ..runtime.decode import decode_tokens, image_grid, png_bytes
from ..runtime.generate import generate as run_generation
from ..runtime.sampling import SamplingConfig
from .build import cached_artifact
from .family_generate import generate_family
from .options import build_policy, model_options, parse_classes, policy_options


def load_decoder(path: str, vq_model: str, config: GPTConfig):
    """The VQ decoder for the GPT's tokens; codebook and stride must match the GPT's.

    `vq_model` "chameleon-vqgan" is Lumina-mGPT's tokenizer (Meta's vqgan.ckpt).
    """
    if vq_model == CHAMELEON_VQ:
        from ..models.chameleon_vq import load_chameleon_vq

        return load_chameleon_vq(path, codes=config.vocab_size)
    vq = load_vq(path, vq_model, encoder=False)
    if vq.config.codebook_size != config.vocab_size:
        raise UserError(f"The VQ checkpoint has {vq.config.codebook_size} codes but the GPT has "
                        f"a vocabulary of {config.vocab_size}; pass the tokenizer the GPT was "
                        "trained with.")
    if vq.config.downsample != config.downsample:
        raise UserError(f"--vq-model {vq_model} downsamples by {vq.config.downsample} but the "
                        f"GPT expects {config.downsample}; pass the matching --vq-model.")
    return vq


def artifact_options(artifact, model_name: str, image_size: int, dtype: str):
    """Model, image size and dtype come from the artifact; contradicting them is an error."""
    context = click.get_current_context()
    manifest = artifact.manifest
    given = {"model_name": ("--model", model_name, manifest["model"]["name"]),
             "image_size": ("--image-size", image_size, manifest["image_size"]),
             "dtype": ("--dtype", dtype, manifest["dtype"])}
    for name, (flag, value, built) in given.items():
        explicit = context.get_parameter_source(name) not in (
            click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
        if explicit and value != built:
            raise UserError(f"{flag} {value} contradicts the artifact, which was built with "
                            f"{flag} {built}; drop {flag} or rebuild the artifact.")
    return manifest["model"]["name"], manifest["image_size"], manifest["dtype"]


DEFAULT_CFG_SCALE, DEMO_CFG_SCALE = 4.0, 1.0


def demo_defaults(model_name, image_size, classes, vq_checkpoint, vq_model):
    """Checkpoint, model, image size, classes and VQ of the bundled demo, unless given."""
    from click.core import ParameterSource

    from ..demo import DEMO_DIR, DEMO_IMAGE_SIZE, DEMO_MODEL_NAME, DEMO_VQ_NAME

    context = click.get_current_context()

    def given(name: str) -> bool:
        return context.get_parameter_source(name) != ParameterSource.DEFAULT

    if given("model_name") and model_name != DEMO_MODEL_NAME:
        raise UserError(f"No weights given for --model {model_name}; pass --checkpoint PATH or "
                        "--random-weights (without them the bundled demo model runs).")
    checkpoint = DEMO_DIR / "gpt.safetensors"
    if not checkpoint.is_file():
        raise UserError(f"The bundled demo weights '{checkpoint}' are missing; reinstall "
                        "linear-export or pass --checkpoint PATH.")
    if not given("vq_checkpoint"):
        vq_checkpoint, vq_model = str(DEMO_DIR / "vq.safetensors"), DEMO_VQ_NAME
    return (str(checkpoint), DEMO_MODEL_NAME,
            image_size if given("image_size") else DEMO_IMAGE_SIZE,
            classes if given("classes") else ",".join(str(c) for c in range(10)),
            vq_checkpoint, vq_model)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@click.command()
@model_options
@policy_options
@click.option("--classes", default="207,360,387,974,88,979,417,279", show_default=True,
              help="Comma-separated class ids, cycled to fill --num-images.")
@click.option("--num-images", type=int, default=None,
              help="Images to generate [default: one per class].")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Images per engine batch (CFG doubles the rows).")
@click.option("--cfg-scale", type=float, default=None,
              help="Classifier-free guidance scale; 1.0 disables CFG [default: 4.0; 1.0 for the "
                   "bundled demo model, whose samples guidance makes worse].")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-k", type=int, default=2000, show_default=True, help="Top-k; 0 disables.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Top-p; 1.0 disables.")
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
    """Generate class-conditional images with a fixed-capacity KV cache.

    With no --checkpoint, --random-weights or --artifact, the bundled demo model runs
    (64 px, 10 procedural classes): `linear-export generate --out samples/`.

    Example: linear-export generate --checkpoint c2i_B_256.pt --model GPT-B --policy linear
    --budget 1/4 --classes 207,360 --out samples/
    """
    demo = family == "llamagen" and artifact_dir is None and checkpoint is None \
        and not random_weights
    if cfg_scale is None:
        # Measured on the demo GPT (40 samples, bundled classifier): class accuracy 52% at
        # CFG 1, 42% at 2, 28% at 4. Guidance there boosts codes the data never uses.
        cfg_scale = DEMO_CFG_SCALE if demo else DEFAULT_CFG_SCALE
    if family != "llamagen":
        generate_family(
            family=family, checkpoint=checkpoint, random_weights=random_weights,
            model_name=model_name, image_size=image_size, dtype=dtype, device=device,
            policy=policy, budget=budget, knobs=knobs,
            sampling=SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                    top_p=top_p),
            prompts=prompts, caption_features=caption_features,
            max_prompt_tokens=max_prompt_tokens, num_images=num_images, batch_size=batch_size,
            seed=seed, engine_name=engine_name, save_tokens=save_tokens, stats_json=stats_json,
            out=out, force=force, artifact_dir=artifact_dir,
            load_vq=None if vq_checkpoint is None or no_decode
            else lambda config: load_decoder(
                vq_checkpoint, CHAMELEON_VQ if family == "lumina" else vq_model, config))
        return
    if checkpoint is not None and Path(checkpoint).is_dir():
        check_family(family, checkpoint)  # a Hugging Face directory of another family
    artifact = None
    if artifact_dir is not None:
        if engine_name not in ("ort", "tensorrt"):
            raise UserError("--artifact runs on the ort or tensorrt engine; add --engine ort.")
        if checkpoint is not None or random_weights:
            raise UserError("--artifact already holds the weights; drop --checkpoint and "
                            "--random-weights.")
        artifact = load_artifact(artifact_dir)
        if artifact.family_name != family:
            raise UserError(f"Artifact '{artifact_dir}' holds a {artifact.family_name} model; "
                            f"pass --family {artifact.family_name}.")
        model_name, image_size, dtype = artifact_options(artifact, model_name, image_size, dtype)
    elif checkpoint is None and not random_weights:
        # No weights named: run the bundled demo model (trained by `linear-export demo train`).
        checkpoint, model_name, image_size, classes, vq_checkpoint, vq_model = demo_defaults(
            model_name, image_size, classes, vq_checkpoint, vq_model)
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images {num_images} must be at least 1.")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1.")
    for path in (save_tokens, stats_json, out):
        if path is not None:
            check_writable(path, force)
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p)

    # Validate everything that needs only the config before spending time on the weights.
    config = get_config(model_name)
    class_list = parse_classes(classes, config.num_classes)
    total = num_images or len(class_list)
    class_list = [class_list[i % len(class_list)] for i in range(total)]
    chosen = build_policy(SequenceLayout.for_image(config, image_size), policy, budget,
                          model_config=config, **knobs)
    decoder = None
    if vq_checkpoint is not None and not no_decode:
        decoder = load_decoder(vq_checkpoint, vq_model, config)
    if engine_name == "tensorrt" and artifact is None:
        raise UserError("--engine tensorrt runs a built artifact's plans; pass --artifact DIR "
                        "from linear-export build --tensorrt.")
    if engine_name in ("ort", "tensorrt"):
        if artifact is None:
            rows = min(batch_size, total) * (2 if sampling.uses_cfg else 1)
            artifact = cached_artifact(checkpoint=checkpoint, model_name=model_name,
                                       image_size=image_size, dtype=dtype, seed=seed,
                                       policy=chosen, rows=rows,
                                       echo=lambda line: click.echo(line, err=True))
        from ..runtime.policies import fit_policy

        if chosen.head_shared and not artifact.head_shared:
            raise UserError(f"Artifact '{artifact.path}' was built without --head-shared, so "
                            "it cannot run --head-budgets; rebuild it with linear-export build "
                            "--head-shared, or drop --head-budgets.")
        chosen = fit_policy(chosen, artifact.capacity)  # the graph's cache size is static
        if decoder is None and not no_decode and "vq_decoder" in artifact.manifest:
            from ..engines.ort_vq import OrtVQDecoder

            decoder = OrtVQDecoder(artifact.path / artifact.manifest["vq_decoder"]["file"])
        engine = make_engine(engine_name, artifact=artifact, device=device,
                             cuda_graph=cuda_graph)
    else:
        model = load_gpt(model_name, image_size, checkpoint, dtype=dtype, device=device,
                         seed=seed)
        engine = make_engine(engine_name, model, cuda_graph=cuda_graph)

    results = [
        run_generation(engine, class_list[start:start + batch_size], chosen, sampling,
                       seed=seed + start, progress=sys.stderr.isatty())
        for start in range(0, total, batch_size)
    ]
    tokens = np.concatenate([result.tokens.numpy() for result in results])
    seconds = sum(result.stats.seconds_generate for result in results)
    largest = results[0].stats  # the first batch is the fullest
    stats = {
        "model": model_name,
        "image_size": image_size,
        "dtype": dtype,
        "policy": chosen.name,
        "budget": chosen.budget,
        "engine": engine_name,
        "cfg_scale": sampling.cfg_scale,
        "batch": min(batch_size, total),
        "images": total,
        "seconds_generate": seconds,
        "images_per_s": total / seconds if seconds else 0.0,
        "seconds_per_image": seconds / total,
        "kv_capacity": chosen.capacity,
        "kv_bytes": largest.kv_bytes,
        "full_kv_bytes": largest.full_kv_bytes,
        "peak_cache_len": largest.peak_cache_len,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if save_tokens is not None:
        write_npy(save_tokens, tokens)
    if stats_json is not None:
        write_json(stats_json, stats)
    if out is not None:
        files = {"tokens.npy": npy_bytes(tokens), "stats.json": json_bytes(stats)}
        if decoder is not None:
            pictures = decode_tokens(decoder.decode_codes, torch.from_numpy(tokens))
            for index, (class_id, picture) in enumerate(zip(class_list, pictures, strict=True)):
                files[f"{index:04d}_class{class_id}_seed{seed}.png"] = png_bytes(picture)
            files["grid.png"] = png_bytes(image_grid(pictures))
        write_directory(out, files, force)
        if decoder is None and not no_decode:
            click.echo("No --vq-checkpoint given: wrote tokens and stats, no images.", err=True)
    click.echo(
        f"{total} images, {chosen.name} policy, budget {chosen.budget} tokens, capacity "
        f"{chosen.capacity} slots: {stats['images_per_s']:.3f} images/s, KV "
        f"{largest.kv_bytes / 2**20:.1f} MiB (full {largest.full_kv_bytes / 2**20:.1f} MiB)"
    )
