"""LlamaGen text-to-image: a 120-token caption prefix of projected T5 features.

Checkpoint keys as the official t2i release: `cls_embedding.cap_proj.fc1/fc2` (a bias-free
GELU-tanh MLP over 2048-d flan-t5-xl features; LlamaGen's autoregressive/models/gpt.py) and
`cls_embedding.uncond_embedding` (120 x 2048) for CFG.
The original left-pads captions and masks the padding as keys for every query; padding
therefore never influences a valid token, and the step feeds only the n valid caption tokens
(their 2D-RoPE rows are zero, so their positions do not matter). Uncond rows take the last n
rows of the learned uncond embedding, as the mask leaves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from ..configs import GPTConfig, SequenceLayout
from ..gpt import GPT
from .base import Family, PrefixGroup

T5_DIM = 2048
CAPTION_TOKENS = 120


class CaptionMLP(nn.Module):
    """fc1 -> GELU-tanh -> fc2, both bias-free as in LlamaGen's release (gpt.py's MLP)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int, tokens: int):
        super().__init__()
        self.cap_proj = CaptionMLP(in_dim, dim)
        self.register_buffer("uncond_embedding", torch.zeros(tokens, in_dim))


@dataclass(frozen=True)
class LlamaGenT2IFamily(Family):
    """Conditions are caption features [n, 2048] (valid tokens only, n <= 120)."""

    caption_dim: int = T5_DIM
    uncond: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def prefix_groups(
        self, conditions: Sequence[torch.Tensor], cfg: bool, device: torch.device
    ) -> list[PrefixGroup]:
        rows: dict[int, list[int]] = {}
        features = []
        for index, caption in enumerate(conditions):
            caption = torch.as_tensor(caption).float()
            if caption.ndim != 2 or caption.shape[1] != self.caption_dim:
                raise UserError(f"Caption features have shape {tuple(caption.shape)}; give "
                                f"[tokens, {self.caption_dim}] T5 features per prompt.")
            self.check_prefix(caption.shape[0], "The caption")
            rows.setdefault(caption.shape[0], []).append(index)
            features.append(caption)
        batch, groups = len(conditions), []
        for length, members in rows.items():
            embeds = [features[i] for i in members]
            if cfg:
                embeds += [self.uncond[self.prefix_capacity - length:].float()] * len(members)
                members = members + [batch + i for i in members]
            stacked = torch.stack(embeds).to(device)
            positions = torch.arange(self.prefix_capacity - length, self.prefix_capacity,
                                     device=device).expand(len(members), -1)
            ids = torch.zeros(len(members), length, dtype=torch.long, device=device)
            groups.append(PrefixGroup(members, ids, positions, self.prefix_capacity, stacked))
        return groups

    def example_conditions(self, count: int, seed: int = 0) -> list[torch.Tensor]:
        """Seeded stand-in caption features of two lengths (bench, verify)."""
        generator = torch.Generator().manual_seed(seed)
        longest = min(self.prefix_capacity, 16)
        return [torch.randn(longest - index % 2, self.caption_dim, generator=generator)
                for index in range(count)]

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("uncond")
        return {"kind": type(self).__name__, **data}


class T2IGPT(GPT):
    """LlamaGen GPT whose prefix is projected caption features instead of a class token."""

    def __init__(self, config: GPTConfig, layout: SequenceLayout, caption_dim: int = T5_DIM):
        super().__init__(config, layout)
        self.cls_embedding = CaptionEmbedder(caption_dim, config.dim, config.cls_token_num)
        self.caption_dim = caption_dim

    @property
    def family(self) -> LlamaGenT2IFamily:
        return LlamaGenT2IFamily(name="llamagen-t2i", prefix_capacity=self.layout.prefix,
                                 caption_dim=self.caption_dim,
                                 uncond=self.cls_embedding.uncond_embedding)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids.clamp(0, self.config.vocab_size - 1))

    def step(self, input_ids, position_ids, past_key, past_value, cache_len, inputs_embeds=None,
             score_position_ids=None):
        """As GPT.step; `inputs_embeds` are raw caption features [B, T, 2048], projected here."""
        if inputs_embeds is not None:
            inputs_embeds = self.cls_embedding.cap_proj(inputs_embeds.to(self.dtype))
        return super().step(input_ids, position_ids, past_key, past_value, cache_len,
                            inputs_embeds=inputs_embeds, score_position_ids=score_position_ids)

    def decode(self, input_ids, position_ids, past_key, past_value, cache_len,
               inputs_embeds=None, **pool):
        """As GPT.decode, with caption features projected as in step()."""
        if inputs_embeds is not None:
            inputs_embeds = self.cls_embedding.cap_proj(inputs_embeds.to(self.dtype))
        return super().decode(input_ids, position_ids, past_key, past_value, cache_len,
                              inputs_embeds=inputs_embeds, **pool)


def load_caption(path: str | Path, caption_dim: int = T5_DIM) -> torch.Tensor:
    """Valid caption features [n, dim] from .npy ([n, dim]) or .safetensors (`caption`, `mask`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"T5 caption features '{path}' do not exist; pass --caption-features "
                        "with a .npy or .safetensors file of [tokens, 2048] flan-t5-xl features.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            features = tensors["caption"]
            mask = tensors.get("mask")
        else:
            features, mask = torch.from_numpy(np.load(path)), None
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"T5 caption features '{path}' cannot be read ({type(error).__name__}); "
                        "give a .npy array or a .safetensors file with keys caption [and "
                        "mask].") from None
    features = features.reshape(-1, features.shape[-1]).float()
    if mask is not None:
        features = features[mask.reshape(-1).bool()]
    if features.shape[-1] != caption_dim:
        raise UserError(f"T5 caption features '{path}' are {features.shape[-1]}-d; the model "
                        f"expects {caption_dim}-d flan-t5-xl features.")
    return features

