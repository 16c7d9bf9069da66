"""PyTorch reference models: the LlamaGen GPT (step contract) and, separately, the VQ decoder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import load_into, read_state_dict
from .configs import GPT_CONFIGS, GPTConfig, SequenceLayout, get_config
from .gpt import GPT, StepModule, init_weights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = [
    "DTYPES", "GPT", "GPT_CONFIGS", "GPTConfig", "SequenceLayout", "StepModule",
    "get_config", "init_weights", "load_gpt", "parse_dtype",
]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"Unknown dtype '{name}'; choose one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_gpt(
    model_name: str,
    image_size: int,
    checkpoint: str | Path | None = None,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    seed: int = 0,
    model_class: type[GPT] = GPT,
    **config_overrides: object,
) -> GPT:
    """A GPT in eval mode: weights from `checkpoint`, or seeded random weights when it is None.

    `model_class` and `config_overrides` serve GPT variants (the t2i GPT: its caption prefix).
    """
    config = get_config(model_name, **config_overrides)
    layout = SequenceLayout.for_image(config, image_size)
    torch_dtype = parse_dtype(dtype)
    model = model_class(config, layout)
    if checkpoint is None:
        init_weights(model, seed=seed)
    else:
        load_into(model, read_state_dict(checkpoint), model_name)
    return model.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
