"""Janus-Pro through transformers' Janus classes: a text prompt prefix, then image codes.

Image codes go through the generation embeddings and aligner; the generation head gives
their logits. CFG as the original: the unconditional row is the prompt with every token but
the first (BOS) and the last (image-start) replaced by the pad token. Positions are 1D and
explicit, so they stay the absolute sequence positions after eviction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ..configs import SequenceLayout
from .base import Family, PrefixGroup, group_by_length
from .hf_decoder import HFDecoderStep, geometry


@dataclass(frozen=True)
class JanusFamily(Family):
    """Prompt token ids in (BOS ... image-start); image code c fed as `text_vocab + c`."""

    pad_id: int = 100002

    def prefix_groups(
        self, conditions: Sequence[Sequence[int]], cfg: bool, device: torch.device
    ) -> list[PrefixGroup]:
        prefixes = [[int(t) for t in prompt] for prompt in conditions]
        for tokens in prefixes:
            self.check_prefix(len(tokens), "The prompt")
        if cfg:
            prefixes += [tokens[:1] + [self.pad_id] * max(len(tokens) - 2, 0) + tokens[1:][-1:]
                         for tokens in prefixes]
        positions = [list(range(len(tokens))) for tokens in prefixes]
        return group_by_length(prefixes, positions, [len(t) for t in prefixes], device)


class JanusStep(HFDecoderStep):
    """A JanusForConditionalGeneration's language model as the step; logits over image codes."""

    def __init__(self, hf: nn.Module, layout: SequenceLayout, *, pad_id: int | None = None):
        language = hf.model.language_model
        text = hf.config.text_config
        codes = hf.config.vq_config.num_embeddings
        super().__init__(language.layers, language.norm, language.rotary_emb.inv_freq,
                         geometry(text, layout, codes), layout)
        self.embed_tokens = language.embed_tokens
        self.generation_embeddings = hf.model.generation_embeddings
        self.generation_aligner = hf.model.generation_aligner
        self.generation_head = hf.model.generation_head
        self.vocab = text.vocab_size
        pad = pad_id if pad_id is not None else getattr(text, "pad_token_id", None)
        self._family = JanusFamily(name="janus", prefix_capacity=layout.prefix,
                                   image_offset=self.vocab,
                                   pad_id=pad if pad is not None else 100002)

    @property
    def family(self) -> JanusFamily:
        return self._family

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text ids below the vocabulary; `vocab + c` is image code c (generation embedding)."""
        is_code = (input_ids >= self.vocab).unsqueeze(-1)
        text = self.embed_tokens(input_ids.clamp(max=self.vocab - 1))
        codes = (input_ids - self.vocab).clamp(0, self.generation_embeddings.num_embeddings - 1)
        image = self.generation_aligner(self.generation_embeddings(codes))
        return torch.where(is_code, image, text)

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.generation_head(hidden)


def load_janus_decoder(directory: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Janus's VQ decoder, read alone (`model.vqmodel.*`) from a local model directory.

    Returns decode(codes [B, h, w]) -> images [B, 3, H, W] in [-1, 1], float32, on the
    CPU, for any grid (the library's decode checks the configured grid; the convolutions do
    not need it).
    """
    from safetensors import safe_open
    from transformers import JanusConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"No .safetensors weights in '{directory}' to read Janus's VQ decoder "
                        "from; convert the checkpoint to safetensors or omit --out.")
    config = JanusConfig.from_pretrained(str(directory), local_files_only=True)
    vq = JanusVQVAE(config.vq_config)
    prefix = "model.vqmodel."
    state = {}
    for file in files:
        with safe_open(str(file), "pt") as weights:
            state.update({key.removeprefix(prefix): weights.get_tensor(key)
                          for key in weights.keys() if key.startswith(prefix)})
    missing = vq.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise UserError(f"'{directory}' lacks Janus's VQ decoder weights ({prefix}{missing[0]} "
                        "and others); pass the full Janus-Pro model directory.")
    vq = vq.float().eval().requires_grad_(False)

    def decode(codes: torch.Tensor) -> torch.Tensor:
        batch, height, width = codes.shape
        vq.quantize.quant_state_dims = [height, width]
        with torch.inference_mode():
            images = vq.decode(codes.reshape(batch, height * width).long().cpu())
        return images.float().clamp(-1, 1)

    return decode
