"""Model families behind one step contract: adapters (base.py) and their loaders."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError
from .base import Family, PrefixGroup

FAMILIES = ("llamagen", "llamagen-t2i", "janus", "lumina")
HF_TYPES = {"janus": "janus", "chameleon": "lumina"}  # config.json model_type -> family

HF_FAMILIES = ("janus", "lumina")  # step models built from a local transformers directory
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what a HF directory's weights hash covers

__all__ = ["FAMILIES", "HF_FAMILIES", "Family", "PrefixGroup", "check_family", "detect_family",
           "family_from_json", "hf_weights_record", "load_hf_step", "load_step_model",
           "random_std", "weights_record"]


def load_step_model(
    family: str, *, checkpoint: str | Path | None, model_name: str, image_size: int,
    dtype: str = "fp32", device: str = "cpu", seed: int = 0, max_prompt_tokens: int = 128,
):
    """Any family's step model in eval mode.

    LlamaGen (c2i, t2i): a checkpoint, or seeded random weights when it is None.
    Janus / Lumina: a local Hugging Face model directory (`max_prompt_tokens` is the prefix).
    """
    check_family(family, checkpoint)
    if family in HF_FAMILIES:
        if checkpoint is None:
            raise UserError(f"--family {family} needs --checkpoint DIR, a local Hugging Face "
                            "model directory (nothing is downloaded).")
        return load_hf_step(family, checkpoint, image_size, max_prompt_tokens, dtype, device)
    from .. import load_gpt

    variant = {}
    if family == "llamagen-t2i":  # the same GPT with a 120-token caption prefix
        from .t2i import CAPTION_TOKENS, T2IGPT

        variant = {"model_class": T2IGPT, "cls_token_num": CAPTION_TOKENS}
    return load_gpt(model_name, image_size, checkpoint, dtype=dtype, device=device, seed=seed,
                    **variant)


def family_from_json(record: dict) -> Family:
    """The adapter an artifact's manifest recorded (Family.to_json)."""
    from .janus import JanusFamily
    from .llamagen import LlamaGenC2I
    from .lumina import LuminaFamily
    from .t2i import LlamaGenT2IFamily

    kinds = {kind.__name__: kind
             for kind in (LlamaGenC2I, JanusFamily, LuminaFamily, LlamaGenT2IFamily)}
    fields = dict(record)
    kind = kinds.get(fields.pop("kind", None))
    if kind is None:
        raise UserError(f"The manifest's model adapter {record.get('kind')!r} is not one this "
                        "linear-export knows; rebuild with linear-export build --force.")
    return kind(**fields)


def random_std() -> float:
    """The std of load_gpt's seeded random init (recorded, so verify can redo it)."""
    import inspect

    from ..gpt import init_weights

    return inspect.signature(init_weights).parameters["std"].default


def weights_record(family: str, checkpoint: str | Path | None, seed: int = 0) -> dict:
    """Where a model's weights come from, as artifacts record it for verify to rebuild the
    reference: a checkpoint's path and hash, a HF directory's hash, or the random init's seed."""
    from ...hashing import sha256_file

    if family in HF_FAMILIES:
        return hf_weights_record(family, checkpoint)
    if checkpoint is None:
        return {"source": "random", "seed": seed, "std": random_std()}
    return {"source": "checkpoint", "path": str(Path(checkpoint).resolve()),
            "sha256": sha256_file(Path(checkpoint))}


def hf_weights_record(family: str, directory: str | Path) -> dict:
    """How verify rebuilds a Janus/Lumina reference: the directory and a hash of its files."""
    import hashlib

    from ...hashing import sha256_file

    root = Path(directory).resolve()
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES):
            digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return {"source": "hf", "family": family, "path": str(root), "sha256": digest.hexdigest()}



def detect_family(checkpoint: str | Path) -> str | None:
    """The family a checkpoint belongs to: a HF directory's model_type, or LlamaGen keys."""
    path = Path(checkpoint)
    if path.is_dir():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
        return HF_TYPES.get(model_type)
    if not path.is_file():
        return None
    from ..checkpoint import read_state_dict

    keys = read_state_dict(path)
    if any(key.endswith("cls_embedding.cap_proj.fc1.weight") for key in keys):
        return "llamagen-t2i"
    if any(key.endswith("cls_embedding.embedding_table.weight") for key in keys):
        return "llamagen"
    return None


def check_family(family: str, checkpoint: str | Path | None) -> None:
    """A clear error for an unknown family or a checkpoint of another family."""
    if family not in FAMILIES:
        raise UserError(f"Unknown family '{family}'; choose one of: {', '.join(FAMILIES)}.")
    if checkpoint is None:
        return
    found = detect_family(checkpoint)
    if found is not None and found != family:
        raise UserError(f"Checkpoint '{checkpoint}' is a {found} model, not {family}; pass "
                        f"--family {found}.")
    if found is None and family in ("janus", "lumina"):
        raise UserError(f"--family {family} needs a local Hugging Face model directory "
                        f"(config.json + weights); '{checkpoint}' is not one.")


def load_hf_step(family: str, directory: str | Path, image_size: int, prefix_capacity: int,
                 dtype: str = "fp32", device: str = "cpu"):
    """A Janus or Lumina step model from a local transformers directory (never downloads)."""
    import torch

    from ..configs import SequenceLayout

    try:
        import transformers
    except ImportError:
        raise UserError(f"--family {family} needs transformers; install linear-export[families]."
                        ) from None
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if family == "janus":
        from .janus import JanusStep

        hf = transformers.JanusForConditionalGeneration.from_pretrained(
            str(directory), local_files_only=True, dtype=torch_dtype)
        stride, make = 16, JanusStep
    else:
        from .lumina import LuminaStep

        hf = transformers.ChameleonForConditionalGeneration.from_pretrained(
            str(directory), local_files_only=True, dtype=torch_dtype)
        stride, make = 16, LuminaStep
    if image_size <= 0 or image_size % stride:
        raise UserError(f"--image-size {image_size} is not a positive multiple of {stride}.")
    grid = image_size // stride
    layout = SequenceLayout(prefix=prefix_capacity, height=grid, width=grid)
    return make(hf.eval(), layout).to(device).eval().requires_grad_(False)
