"""Load a model (a checkpoint, seeded random weights, the bundled demo, any family), its
conditions and its image decoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models.chameleon_vq import NAME as CHAMELEON_VQ
from ..models.configs import GPTConfig
from ..models.families import FAMILIES, check_family, load_step_model
from ..models.families.llamagen import check_class_ids

DEFAULT_CFG_SCALE = 4.0  # LlamaGen's sample_c2i default
# Measured on the demo GPT (40 samples, bundled classifier): class accuracy 52% at CFG 1, 42%
# at 2, 28% at 4. Guidance there boosts codes the data never uses.
DEMO_CFG_SCALE = 1.0

# How Janus-Pro wraps a prompt before the image: the "deepseek" SFT template with an empty
# system prompt (janus/utils/conversation.py; the stripped prompt, as its processor strips it),
# then the image-start tag (its README's generation example). Lumina's is in its family module.
JANUS_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from; recorded on the model as `model.source`."""

    family: str = "llamagen"
    checkpoint: str | None = None  # a LlamaGen file, or a Janus/Lumina Hugging Face directory
    model: str = "GPT-B"
    image_size: int = 256
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0  # random weights' seed
    random_weights: bool = False
    max_prompt_tokens: int = 128  # janus/lumina: the prefix capacity
    bundled_demo: bool = False  # the checkpoint is the bundled demo's (see demo_source)

    @property
    def demo(self) -> bool:
        """No weights named: the bundled demo model (trained by `linear-export demo train`)."""
        return self.bundled_demo or (self.family == "llamagen" and self.checkpoint is None
                                     and not self.random_weights)

    @property
    def default_cfg_scale(self) -> float:
        return DEMO_CFG_SCALE if self.demo else DEFAULT_CFG_SCALE


def default_cfg_scale(source: ModelSource, artifact: str | Path | None = None) -> float:
    """The CFG scale to sample with when none is given: LlamaGen's 4.0, the bundled demo's
    1.0. With an artifact, its own model decides (a source that names no weights is not the
    demo then)."""
    if artifact is None:
        return source.default_cfg_scale
    from ..demo import DEMO_MODEL_NAME
    from ..export.artifact import load_artifact

    model = load_artifact(artifact, check_hashes=False).manifest["model"]["name"]
    return DEMO_CFG_SCALE if model == DEMO_MODEL_NAME else DEFAULT_CFG_SCALE


def demo_source(source: ModelSource, *, model_given: bool = False,
                image_size_given: bool = False) -> ModelSource:
    """`source` pointed at the bundled demo's weights (64 px, 10 procedural classes)."""
    from ..demo import DEMO_DIR, DEMO_IMAGE_SIZE, DEMO_MODEL_NAME

    if model_given and source.model != DEMO_MODEL_NAME:
        raise UserError(f"No weights given for --model {source.model}; pass --checkpoint PATH or "
                        "--random-weights (without them the bundled demo model runs).")
    checkpoint = DEMO_DIR / "gpt.safetensors"
    if not checkpoint.is_file():
        raise UserError(f"The bundled demo weights '{checkpoint}' are missing; reinstall "
                        "linear-export or pass --checkpoint PATH.")
    return ModelSource(checkpoint=str(checkpoint), model=DEMO_MODEL_NAME,
                       image_size=source.image_size if image_size_given else DEMO_IMAGE_SIZE,
                       dtype=source.dtype, device=source.device, seed=source.seed,
                       bundled_demo=True)


def load_model(checkpoint: str | Path | None = None, *, family: str = "llamagen",
               model: str = "GPT-B", image_size: int = 256, dtype: str = "fp32",
               device: str = "cpu", seed: int = 0, random_weights: bool = False,
               max_prompt_tokens: int = 128) -> torch.nn.Module:
    """A step model in eval mode; with no checkpoint and no `random_weights`, the bundled demo.

    The result has `.source` (a ModelSource) and `.family` (how the runtime drives it)."""
    source = ModelSource(family, None if checkpoint is None else str(checkpoint), model,
                         image_size, dtype, device, seed, random_weights, max_prompt_tokens)
    return load_source(source)


def load_source(source: ModelSource) -> torch.nn.Module:
    """The model a ModelSource names (see load_model)."""
    if source.family not in FAMILIES:
        raise UserError(f"Unknown family '{source.family}'; choose one of: "
                        f"{', '.join(FAMILIES)}.")
    if source.demo and not source.bundled_demo:
        source = demo_source(source)
    if source.family == "llamagen-t2i" and source.checkpoint is None and not source.random_weights:
        raise UserError("--family llamagen-t2i needs --checkpoint PATH (a LlamaGen t2i GPT) or "
                        "--random-weights.")
    if source.checkpoint is not None and Path(source.checkpoint).is_dir():
        check_family(source.family, source.checkpoint)  # a Hugging Face directory
    loaded = load_step_model(source.family, checkpoint=source.checkpoint,
                             model_name=source.model, image_size=source.image_size,
                             dtype=source.dtype, device=source.device, seed=source.seed,
                             max_prompt_tokens=source.max_prompt_tokens)
    loaded.source = source
    return loaded


def parse_classes(text: str, num_classes: int | None = None) -> list[int]:
    """'207,360' -> [207, 360], each within the model's classes (when `num_classes` is
    known)."""
    try:
        classes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(f"--classes {text!r} is not a comma-separated list of class ids such as "
                        "207,360,387.") from None
    if not classes:
        raise UserError("--classes is empty; give at least one class id such as 207.")
    if num_classes is not None:
        check_class_ids(classes, num_classes)
    return classes


def prompt_conditions(engine, prompts: tuple[str, ...] = (),
                      caption_features: tuple[str, ...] = (),
                      checkpoint: str | None = None) -> list:
    """What a text family's adapter takes: T5 caption features (llamagen-t2i) or prompt token
    ids tokenized with the model's own tokenizer from `checkpoint` (janus, lumina)."""
    family = engine.family.name
    if family == "llamagen-t2i":
        from ..models.families.t2i import load_caption

        if not caption_features:
            raise UserError("--family llamagen-t2i needs T5 caption features; pass "
                            "--caption-features FILE (.npy or .safetensors, [tokens, 2048]) "
                            "per prompt.")
        return [load_caption(path, engine.family.caption_dim) for path in caption_features]
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

    image_size = engine.layout.height * 16  # Lumina's tokenizer strides by 16
    return [prompt_ids(tokenizer, p, image_size) for p in prompts]


def load_vq_decoder(path: str | Path, vq_model: str, config: GPTConfig):
    """A VQ decoder for the GPT's tokens from its checkpoint; codebook and stride must match.

    `vq_model` "chameleon-vqgan" is Lumina-mGPT's tokenizer (Meta's vqgan.ckpt)."""
    from ..models.vq import load_vq

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
