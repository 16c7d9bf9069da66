"""`generate --family t2i|janus|lumina`: token grids from prompts (or caption features)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import torch

from ..engines import make_engine
from ..errors import UserError
from ..models.families import check_family, load_step_model
from ..outputs import json_bytes, npy_bytes, write_directory, write_json, write_npy
from ..runtime.decode import decode_tokens, image_grid, png_bytes
from ..runtime.generate import generate as run_generation
from ..runtime.sampling import SamplingConfig
from .options import build_policy

# How Janus-Pro wraps a prompt before the image: the "deepseek" SFT template with an empty
# system prompt (janus/utils/conversation.py; the stripped prompt, as its processor strips it),
# then the image-start tag (its README's generation example). Lumina's is in its family module.
JANUS_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>"


def artifact_engine(family: str, engine_name: str, artifact_dir: Path | None, device: str):
    """The ort/tensorrt engine of a family's artifact (built by build --family)."""
    from ..export.artifact import load_artifact

    if engine_name == "torch":
        raise UserError("--artifact runs on the ort or tensorrt engine; add --engine ort.")
    if artifact_dir is None:
        raise UserError(f"--family {family} --engine {engine_name} runs a built artifact; pass "
                        f"--artifact DIR from linear-export build --family {family}.")
    artifact = load_artifact(artifact_dir)
    if artifact.family_name != family:
        raise UserError(f"Artifact '{artifact_dir}' holds a {artifact.family_name} model, not "
                        f"{family}; pass --family {artifact.family_name}.")
    return make_engine(engine_name, artifact=artifact, device=device)


def conditions_for(family: str, adapter, checkpoint: str | None, prompts: tuple[str, ...],
                   caption_features: tuple[str, ...], image_size: int) -> list:
    """What the family's adapter (engine.family) takes: caption features or prompt token ids."""
    if family == "llamagen-t2i":
        from ..models.families.t2i import load_caption

        if not caption_features:
            raise UserError("--family llamagen-t2i needs T5 caption features; pass "
                            "--caption-features FILE (.npy or .safetensors, [tokens, 2048]) "
                            "per prompt.")
        return [load_caption(path, adapter.caption_dim) for path in caption_features]
    if not prompts:
        raise UserError(f"--family {family} needs at least one --prompt TEXT.")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"No tokenizer in '{checkpoint}' ({type(error).__name__}); pass the "
                        "model directory that holds its tokenizer files.") from None
    if family == "janus":
        return [tokenizer.encode(JANUS_TEMPLATE.format(prompt=p.strip())) for p in prompts]
    from ..models.families.lumina import prompt_ids

    return [prompt_ids(tokenizer, p, image_size) for p in prompts]


def family_decoder(family: str, checkpoint: str | None, load_vq, engine, from_artifact: bool):
    """decode(codes) for --out, or None: Janus's own, --vq-checkpoint's, or the artifact's."""
    if family == "janus":
        from ..models.families.janus import load_janus_decoder

        return load_janus_decoder(checkpoint)
    if load_vq is not None:
        return load_vq(engine.config).decode_codes
    if from_artifact and "vq_decoder" in engine.artifact.manifest:
        from ..engines.ort_vq import OrtVQDecoder  # the artifact's decoder (build --vq-checkpoint)

        record = engine.artifact.manifest["vq_decoder"]
        return OrtVQDecoder(engine.artifact.path / record["file"]).decode_codes
    return None


def generate_family(*, family: str, checkpoint: str | None, random_weights: bool,
                    model_name: str, image_size: int, dtype: str, device: str, policy: str,
                    budget: str, knobs: dict, sampling: SamplingConfig, prompts: tuple[str, ...],
                    caption_features: tuple[str, ...], max_prompt_tokens: int, num_images,
                    batch_size: int, seed: int, engine_name: str, save_tokens: Path | None,
                    stats_json: Path | None, out: Path | None, force: bool,
                    artifact_dir: Path | None = None, load_vq=None) -> None:
    """Run a non-c2i family on the torch engine, or a built artifact on ort/tensorrt.

    `load_vq(config)`: the VQ decoder of --vq-checkpoint: LlamaGen's for llamagen-t2i images,
    Chameleon's VQGAN for lumina (an artifact built with one decodes with its ONNX graph).
    """
    check_family(family, checkpoint)
    if knobs.get("head_budgets") is not None:
        raise UserError(f"--head-budgets runs on LlamaGen class-to-image models for now, not "
                        f"--family {family}; drop it.")
    if load_vq is not None and family == "janus":
        raise UserError("--vq-checkpoint decodes LlamaGen or Chameleon tokens; --family janus "
                        "decodes with Janus's own VQ decoder from the model directory; drop "
                        "--vq-checkpoint.")
    if engine_name != "torch" or artifact_dir is not None:
        model, engine = None, artifact_engine(family, engine_name, artifact_dir, device)
        checkpoint = checkpoint or engine.artifact.manifest["weights"].get("path")
        image_size = int(engine.artifact.manifest["image_size"])
        dtype = engine.artifact.dtype_name
    else:
        if family == "llamagen-t2i" and checkpoint is None and not random_weights:
            raise UserError("--family llamagen-t2i needs --checkpoint PATH (a LlamaGen t2i GPT) "
                            "or --random-weights.")
        model = load_step_model(family, checkpoint=checkpoint, model_name=model_name,
                                image_size=image_size, dtype=dtype, device=device, seed=seed,
                                max_prompt_tokens=max_prompt_tokens)
        engine = make_engine("torch", model)
    conditions = conditions_for(family, engine.family, checkpoint, prompts, caption_features,
                                image_size)
    # Loaded before generating: a bad decoder fails early.
    decode = None if out is None else family_decoder(family, checkpoint, load_vq, engine,
                                                     from_artifact=model is None)
    total = num_images or len(conditions)
    conditions = [conditions[i % len(conditions)] for i in range(total)]
    chosen = build_policy(engine.family.token_layout(engine.layout), policy, budget, **knobs)
    if model is None:
        from ..runtime.policies import fit_policy

        chosen = fit_policy(chosen, engine.capacity)  # the graph's cache size is static
    results = [run_generation(engine, conditions[start:start + batch_size], chosen, sampling,
                              seed=seed + start, progress=sys.stderr.isatty())
               for start in range(0, total, batch_size)]
    tokens = np.concatenate([result.tokens.numpy() for result in results])
    seconds = sum(result.stats.seconds_generate for result in results)
    largest = results[0].stats
    stats = {"family": family, "image_size": image_size, "dtype": dtype, "policy": chosen.name,
             "budget": chosen.budget, "images": total, "seconds_generate": seconds,
             "kv_capacity": chosen.capacity, "kv_bytes": largest.kv_bytes,
             "full_kv_bytes": largest.full_kv_bytes, "peak_cache_len": largest.peak_cache_len}
    if save_tokens is not None:
        write_npy(save_tokens, tokens)
    if stats_json is not None:
        write_json(stats_json, stats)
    if out is not None:
        files = {"tokens.npy": npy_bytes(tokens), "stats.json": json_bytes(stats)}
        if decode is not None:
            pictures = decode_tokens(decode, torch.from_numpy(tokens))
            files.update({f"{index:04d}_seed{seed}.png": png_bytes(picture)
                          for index, picture in enumerate(pictures)})
            files["grid.png"] = png_bytes(image_grid(pictures))
        write_directory(out, files, force)
    written = "images and token grids" if decode is not None else (
        "token grids written; pass --vq-checkpoint (Chameleon's vqgan.ckpt) for images"
        if family == "lumina" else "token grids written; decode them with the family's own VQ "
        "decoder")
    click.echo(f"{total} images ({family}), {chosen.name} policy, capacity {chosen.capacity} "
               f"slots: {written}.")
