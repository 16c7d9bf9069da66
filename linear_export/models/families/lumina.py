"""Lumina-mGPT through transformers' Chameleon classes: lines of w codes + one end-of-line.

Sequence: prompt tokens, image-start, height and width tokens, then h lines of w image
tokens each closed by an end-of-line token. CFG's unconditional rows have their own short
context (image-start and the size tokens only), so they form a second prefix group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UserError
from ..configs import SequenceLayout
from .base import Family, PrefixGroup, group_by_length
from .hf_decoder import HFDecoderStep, geometry

# Lumina-mGPT's special tokens (Chameleon vocabulary); override for other releases.
IMAGE_START_ID = 8197
END_OF_LINE_ID = 8803
SIZE_BASE_ID = 8804  # the height token is SIZE_BASE_ID + h, the width token SIZE_BASE_ID + w


@dataclass(frozen=True)
class LuminaFamily(Family):
    """Prompt token ids in; image code c fed as `vocab_size + c` (mapped to BPE in the graph)."""

    height: int = 0
    width: int = 0
    image_start_id: int = IMAGE_START_ID
    size_base_id: int = SIZE_BASE_ID

    def image_context(self) -> list[int]:
        return [self.image_start_id, self.size_base_id + self.height,
                self.size_base_id + self.width]

    def prompt_capacity(self) -> int:
        return self.prefix_capacity - len(self.image_context())

    def prefix_groups(
        self, conditions: Sequence[Sequence[int]], cfg: bool, device: torch.device
    ) -> list[PrefixGroup]:
        prefixes = []
        for prompt in conditions:
            tokens = [int(t) for t in prompt] + self.image_context()
            self.check_prefix(len(tokens), "The prompt (with the image-start and size tokens)")
            prefixes.append(tokens)
        if cfg:
            prefixes += [self.image_context()] * len(conditions)
        positions = [list(range(len(tokens))) for tokens in prefixes]
        return group_by_length(prefixes, positions, [len(t) for t in prefixes], device)


class LuminaStep(HFDecoderStep):
    """A ChameleonForConditionalGeneration's decoder as the step; logits over image codes."""

    def __init__(self, hf: nn.Module, layout: SequenceLayout, *,
                 eol_id: int = END_OF_LINE_ID, image_start_id: int = IMAGE_START_ID,
                 size_base_id: int = SIZE_BASE_ID):
        text = hf.config
        if getattr(text, "swin_norm", False):
            raise UserError("This Chameleon checkpoint uses swin_norm, which the Lumina step "
                            "does not implement; use a Lumina-mGPT checkpoint without it.")
        mapping = hf.model.vocabulary_mapping.img2bpe
        if not mapping:
            raise UserError("The Chameleon config has no image tokens in its vocabulary_map; "
                            "pass a Lumina-mGPT checkpoint directory.")
        codes = len(mapping)
        special = {"end-of-line": eol_id, "image-start": image_start_id,
                   "largest size": size_base_id + max(layout.height, layout.width)}
        for what, token in special.items():
            if not 0 <= token < text.vocab_size:
                raise UserError(f"Lumina's {what} token id {token} is outside this model's "
                                f"vocabulary of {text.vocab_size}; pass a Lumina-mGPT "
                                "checkpoint directory.")
        super().__init__(hf.model.layers, hf.model.norm, hf.model.rotary_emb.inv_freq,
                         geometry(text, layout, codes), layout)
        self.embed_tokens, self.lm_head = hf.model.embed_tokens, hf.lm_head
        self.vocab = text.vocab_size
        self.register_buffer("code_ids", torch.tensor([mapping[c] for c in range(codes)]),
                             persistent=False)
        self._family = LuminaFamily(
            name="lumina", prefix_capacity=layout.prefix, image_offset=self.vocab, line_extra=1,
            eol_id=eol_id, height=layout.height, width=layout.width,
            image_start_id=image_start_id, size_base_id=size_base_id)

    @property
    def family(self) -> LuminaFamily:
        return self._family

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids below the vocabulary are tokens; `vocab + c` is image code c (its BPE token)."""
        is_code = input_ids >= self.vocab
        codes = (input_ids - self.vocab).clamp(0, self.code_ids.shape[0] - 1)
        return self.embed_tokens(torch.where(is_code, self.code_ids[codes], input_ids))

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[..., self.code_ids]
