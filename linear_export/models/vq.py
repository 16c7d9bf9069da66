"""LlamaGen-compatible VQ image tokenizer (encoder, l2-normalised codebook, decoder): loading
a checkpoint strictly, with one-sentence errors; the network itself is in `vq_network.py`,
whose names are importable from here too.

Module and parameter names mirror the official release so that `vq_ds16_c2i.pt` loads
unchanged.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from linear_export.errors import UserError

from .vq_network import (
    VQ_CONFIGS,
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    Level,
    ResnetBlock,
    Upsample,
    VectorQuantizer,
    VQConfig,
    VQLosses,
    VQModel,
    VQOutput,
)

# Keys some official files carry that this model has no use for.
_IGNORED_KEYS = ("quantize.codebook_used",)
# Keys that only a GPT checkpoint has.
_GPT_MARKERS = ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", "output.weight")



def _resolve_config(config: str | VQConfig) -> VQConfig:
    """Named config or VQConfig -> VQConfig."""
    if isinstance(config, VQConfig):
        return config
    if config not in VQ_CONFIGS:
        raise UserError(f"unknown VQ model {config!r}; choose one of {', '.join(VQ_CONFIGS)}")
    return VQ_CONFIGS[config]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors or torch .pt file, unwrapping the usual wrapper keys."""
    if not path.is_file():
        raise UserError(f"VQ checkpoint {str(path)!r} does not exist; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            # Training checkpoints store their argparse options next to the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text here advises weights_only=False, which is not advice to pass on.
        raise UserError(f"cannot read VQ checkpoint {str(path)!r}: it is not a torch file of "
                        "tensors and plain values; re-save its state dict or use "
                        ".safetensors") from exc
    except Exception as exc:  # unpickling and safetensors parsing fail in many ways
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read VQ checkpoint {str(path)!r} ({first_line}); "
                        "is it a complete .pt or .safetensors file?") from exc
    if isinstance(obj, dict):
        for wrapper in ("model", "module", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"VQ checkpoint {str(path)!r} holds no state dict of tensors")
    sd: dict[str, torch.Tensor] = obj
    # DDP and torch.compile add a prefix to every key; strip it when all keys share it.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _expected_shapes(config: VQConfig, encoder: bool) -> dict[str, torch.Size]:
    """Key -> shape of a model's state dict, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in VQModel(config, encoder=encoder).state_dict().items()}


def _mismatch_sentence(
    path: Path, sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], name: str
) -> str | None:
    """One sentence describing how `sd` differs from `expected`, or None if it fits."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shaped = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
        for k in expected if k in sd and sd[k].shape != expected[k]
    ]
    if not (missing or unexpected or shaped):
        return None
    if any(k in sd for k in _GPT_MARKERS):
        return (f"{str(path)!r} does not fit VQ model {name}: this looks like a GPT checkpoint, "
                "not a VQ tokenizer; pass it as --checkpoint")
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            plural = "s" if len(keys) > 1 else ""
            parts.append(f"{len(keys)} {label} key{plural} ({', '.join(keys[:3])}{more})")
    return f"{str(path)!r} does not fit VQ model {name}: {'; '.join(parts)}"


def load_vq(path: str | Path, config: str | VQConfig = "VQ-16", *, encoder: bool = True) -> VQModel:
    """Load a LlamaGen-format VQ checkpoint (.pt or .safetensors) strictly, in eval mode."""
    path = Path(path)
    cfg = _resolve_config(config)
    name = config if isinstance(config, str) else "(custom config)"
    sd = _read_state_dict(path)
    drop = _IGNORED_KEYS if encoder else (*_IGNORED_KEYS, "encoder.", "quant_conv.")
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    problem = _mismatch_sentence(path, sd, _expected_shapes(cfg, encoder), name)
    if problem is not None:
        fits = [n for n, c in VQ_CONFIGS.items()
                if c != cfg and _mismatch_sentence(path, sd, _expected_shapes(c, encoder), n)
                is None]
        hint = f"; it matches {fits[0]}, so pass that model name" if fits else ""
        raise UserError(problem + hint)
    # Build without allocating, then adopt the checkpoint's tensors (as float32).
    with torch.device("meta"):
        model = VQModel(cfg, encoder=encoder)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    # Loaded models serve inference; call requires_grad_(True) to fine-tune.
    return model.eval().requires_grad_(False)


__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "Level",
    "ResnetBlock",
    "Upsample",
    "VQ_CONFIGS",
    "VQConfig",
    "VQLosses",
    "VQModel",
    "VQOutput",
    "VectorQuantizer",
    "load_vq",
]
