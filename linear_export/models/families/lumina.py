"""Lumina-mGPT through transformers' Chameleon classes: lines of w codes + one end-of-line.

The sequence as Lumina-mGPT's own processing builds it (lumina_mgpt/data/item_processor.py,
data/convertsation.py, inference_solver.py): BOS, the instruction of PROMPT_TEMPLATE, the
human turn's separator `<reserved08706>`, then the image: `<racm3:break>`, the height and
width tokens `<reserved{8800 + n:05d}>` (id 8804 + n, n counted in 32-pixel grids, so a grid
of n is 2n token rows), and h lines of w codes each closed by `<reserved08799>`. CFG's
unconditional rows start at the image-start token (image start and size tokens only), so
they form a second prefix group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ..configs import SequenceLayout
from .base import Family, PrefixGroup, group_by_length
from .hf_decoder import HFDecoderStep, geometry

# Lumina-mGPT's special tokens (Chameleon vocabulary; `<reservedNNNNN>` is id NNNNN + 4, as the
# official weight conversion's `sep_token_id = 8710` for `<reserved08706>` shows).
IMAGE_START_ID = 8197  # <racm3:break>
SEPARATOR_ID = 8710  # <reserved08706>: the conversation template ends every turn with it
END_OF_LINE_ID = 8803  # <reserved08799>
SIZE_BASE_ID = 8804  # <reserved08800>: a side of n 32-pixel grids is the token SIZE_BASE_ID + n
GRID_PIXELS = 32  # the processor's patch_size: size tokens count these
TOKENS_PER_GRID = GRID_PIXELS // 16  # the VQ stride is 16: 2 token rows per grid
PROMPT_TEMPLATE = ("Generate an image of {width}x{height} according to the following "
                   "prompt:\n{prompt}")


def prompt_ids(tokenizer: Any, prompt: str, image_size: int) -> list[int]:
    """BOS and the tokenized instruction, as the official solver's human turn (without its
    separator, which the family appends): `tokenizer.encode(text, add_special_tokens=False)`."""
    text = PROMPT_TEMPLATE.format(width=image_size, height=image_size, prompt=prompt)
    bos = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None),
               None)  # the official Tokenizer's fallback; a tokenizer with neither gets none
    return [bos] * (bos is not None) + tokenizer.encode(text, add_special_tokens=False)


def check_grids(height: int, width: int) -> None:
    """Lumina-mGPT's size tokens count 32-pixel grids: the token grid must be even."""
    if height % TOKENS_PER_GRID or width % TOKENS_PER_GRID:
        raise UserError(f"Lumina-mGPT draws whole {GRID_PIXELS}-pixel grids, but this image is "
                        f"{height * 16}x{width * 16} pixels; pass an --image-size that is a "
                        f"multiple of {GRID_PIXELS} (512 or 768).")


@dataclass(frozen=True)
class LuminaFamily(Family):
    """Prompt token ids in; image code c fed as `vocab_size + c` (mapped to BPE in the graph)."""

    height: int = 0  # token rows (2 per 32-pixel grid)
    width: int = 0  # token columns
    image_start_id: int = IMAGE_START_ID
    size_base_id: int = SIZE_BASE_ID
    separator_id: int = SEPARATOR_ID

    def image_context(self) -> list[int]:
        """Image start, then height and width in 32-pixel grids: the uncond rows' context."""
        return [self.image_start_id, self.size_base_id + self.height // TOKENS_PER_GRID,
                self.size_base_id + self.width // TOKENS_PER_GRID]

    def cond_context(self, prompt: Sequence[int]) -> list[int]:
        """A prompt's whole prefix: its ids, the turn separator, then the image context."""
        return [int(t) for t in prompt] + [self.separator_id] + self.image_context()

    def prompt_capacity(self) -> int:
        return self.prefix_capacity - len(self.cond_context([]))

    def prefix_groups(
        self, conditions: Sequence[Sequence[int]], cfg: bool, device: torch.device
    ) -> list[PrefixGroup]:
        check_grids(self.height, self.width)
        prefixes = []
        for prompt in conditions:
            tokens = self.cond_context(prompt)
            self.check_prefix(len(tokens), "The prompt (with the separator, image-start and "
                              "size tokens)")
            prefixes.append(tokens)
        if cfg:
            prefixes += [self.image_context()] * len(conditions)
        positions = [list(range(len(tokens))) for tokens in prefixes]
        return group_by_length(prefixes, positions, [len(t) for t in prefixes], device)


class LuminaStep(HFDecoderStep):
    """A ChameleonForConditionalGeneration's decoder as the step; logits over image codes."""

    def __init__(self, hf: nn.Module, layout: SequenceLayout, *,
                 eol_id: int = END_OF_LINE_ID, image_start_id: int = IMAGE_START_ID,
                 size_base_id: int = SIZE_BASE_ID, separator_id: int = SEPARATOR_ID):
        text = hf.config
        if getattr(text, "swin_norm", False):
            raise UserError("This Chameleon checkpoint uses swin_norm, which the Lumina step "
                            "does not implement; use a Lumina-mGPT checkpoint without it.")
        mapping = hf.model.vocabulary_mapping.img2bpe
        if not mapping:
            raise UserError("The Chameleon config has no image tokens in its vocabulary_map; "
                            "pass a Lumina-mGPT checkpoint directory.")
        codes = len(mapping)
        check_grids(layout.height, layout.width)
        special = {"end-of-line": eol_id, "image-start": image_start_id, "separator": separator_id,
                   "largest size": size_base_id + max(layout.height, layout.width)
                   // TOKENS_PER_GRID}
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
            image_start_id=image_start_id, size_base_id=size_base_id, separator_id=separator_id)

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
