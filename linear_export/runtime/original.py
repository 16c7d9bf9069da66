"""The peer: LlamaGen's own sampling code, imported from a local checkout and timed on the
same weights (`bench --llamagen-src DIR`).

Nothing of it is copied into this project: the user points at their checkout of
FoundationVision/LlamaGen, its `autoregressive.models.gpt` builds the model the way its
`sample_c2i.py` does, our model's state dict (official key names) is loaded into it, and its
`autoregressive.models.generate.generate` runs with the bench's CFG and top-k.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..models.gpt import GPT
from .sampling import SamplingConfig


def import_original(src: str | Path):
    """LlamaGen's (GPT_models, generate) from a checkout; one clear error if it is not one."""
    root = Path(src).resolve()
    if not (root / "autoregressive" / "models" / "generate.py").is_file():
        raise UserError(f"--llamagen-src '{src}' is not a LlamaGen checkout (no "
                        "autoregressive/models/generate.py); clone FoundationVision/LlamaGen "
                        "and pass its directory.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # its modules import `utils.*` from the repo root
    try:
        gpt = importlib.import_module("autoregressive.models.gpt")
        generate = importlib.import_module("autoregressive.models.generate")
    except ImportError as error:
        raise UserError(f"LlamaGen's code in '{src}' does not import here ({error}); install "
                        "what its requirements name.") from None
    return gpt.GPT_models, generate.generate


class OriginalLoop:
    """LlamaGen's generate() on `model`'s weights: the bench's peer, measured like a loop."""

    def __init__(self, model: GPT, src: str | Path, model_name: str):
        models, self._generate = import_original(src)
        if model_name not in models:
            raise UserError(f"LlamaGen's code has no {model_name}; its models: "
                            f"{', '.join(models)}.")
        config, layout = model.config, model.layout
        self.original = models[model_name](
            vocab_size=config.vocab_size, block_size=layout.image_tokens,
            num_classes=config.num_classes, cls_token_num=layout.prefix, model_type="c2i",
        ).to(dtype=model.dtype)
        missing, unexpected = self.original.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [key for key in missing if "freqs_cis" not in key]:
            raise UserError(f"LlamaGen's {model_name} does not take these weights (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}).")
        self.original.eval()
        self.tokens = layout.image_tokens
        self.config = config  # what the bench reads (num_classes), as from an engine

    @torch.no_grad()
    def generate(self, class_ids: Sequence[int], sampling: SamplingConfig, seed: int = 0,
                 tokens: int | None = None) -> tuple[torch.Tensor, float]:
        """Its tokens [B, N] and the seconds its generate() took (`tokens` fewer: a warm-up)."""
        torch.manual_seed(seed)
        cond = torch.tensor(list(class_ids), dtype=torch.long)
        started = time.perf_counter()
        out = self._generate(self.original, cond, tokens or self.tokens,
                             cfg_scale=sampling.cfg_scale, cfg_interval=-1,
                             temperature=sampling.temperature or 1.0, top_k=sampling.top_k,
                             top_p=1.0, sample_logits=True)
        return out, time.perf_counter() - started
