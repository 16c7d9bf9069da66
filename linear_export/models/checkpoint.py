"""Read official LlamaGen checkpoints (.pt or .safetensors) and check them against a model."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from .configs import GPT_CONFIGS

WRAPPER_KEYS = ("model", "module", "state_dict")
# Buffers some training code saves beside the weights; they are not weights and are rebuilt.
IGNORED_SUFFIXES = ("kv_cache.k_cache", "kv_cache.v_cache", "freqs_cis", "causal_mask")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: `.safetensors`, or a torch pickle holding a (wrapped) dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' does not exist; pass the path of a .pt or "
                        ".safetensors file.")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, SafetensorError) as error:
        raise UserError(f"Checkpoint '{path}' cannot be read ({type(error).__name__}); it is "
                        "corrupt or not a PyTorch/safetensors file.") from None
    if isinstance(payload, dict):
        for key in WRAPPER_KEYS:
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(
        isinstance(value, torch.Tensor) for value in payload.values()
    ):
        raise UserError(f"Checkpoint '{path}' holds no state dict (expected tensors, possibly "
                        f"under one of {', '.join(WRAPPER_KEYS)}).")
    return payload


def guess_config_name(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The named config whose width and depth match a state dict, if any."""
    embedding = state_dict.get("tok_embeddings.weight")
    if embedding is None:
        return None
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("layers.")})
    for name, config in GPT_CONFIGS.items():
        if config.dim == embedding.shape[1] and config.n_layer == depth:
            return name
    return None


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], model_name: str) -> None:
    """Copy weights into `model` strictly: a missing, unexpected or mis-shaped key is an error."""
    state_dict = {
        key.removeprefix("module."): value
        for key, value in state_dict.items()
        if not key.endswith(IGNORED_SUFFIXES)
    }
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mis_shaped = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected[:3])}")
        if mis_shaped:
            problems.append(f"mis-shaped {', '.join(mis_shaped[:3])}")
        guess = guess_config_name(state_dict)
        kind = "t2i" if hasattr(model, "caption_dim") else "c2i"
        hint = (f"it looks like --model {guess}" if guess and guess != model_name
                else f"check --model and that this is a LlamaGen {kind} GPT checkpoint")
        if any(".cap_proj." in key and key.endswith(".bias") for key in unexpected):
            hint = ("LlamaGen's caption MLP (cap_proj.fc1/fc2) has no biases, so this is not a "
                    "checkpoint of the official t2i release; drop the bias tensors or re-save it "
                    "from LlamaGen's code")
        raise UserError(f"Checkpoint does not match --model {model_name} "
                        f"({'; '.join(problems)}); {hint}.")
    model.load_state_dict(state_dict, strict=True)

