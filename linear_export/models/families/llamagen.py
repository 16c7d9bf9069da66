"""LlamaGen class-conditional: one class token of prefix, image codes are the token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...errors import UserError
from ..configs import GPTConfig, SequenceLayout
from .base import Family, PrefixGroup


def check_class_ids(class_ids: Sequence[int], num_classes: int) -> None:
    """One sentence for the first class id outside 0..num_classes - 1."""
    bad = [c for c in class_ids if not 0 <= int(c) < num_classes]
    if bad:
        raise UserError(f"Class id {bad[0]} is out of range; this model has classes "
                        f"0..{num_classes - 1}.")


@dataclass(frozen=True)
class LlamaGenC2I(Family):
    """Class token `vocab + class` at position 0..P-1; CFG rows use the null class."""

    vocab_size: int = 16384
    num_classes: int = 1000

    @classmethod
    def for_model(cls, config: GPTConfig, layout: SequenceLayout) -> LlamaGenC2I:
        return cls(name="llamagen", prefix_capacity=layout.prefix,
                   vocab_size=config.vocab_size, num_classes=config.num_classes)

    def example_conditions(self, count: int, seed: int = 0) -> list[int]:
        """Class ids 0, 1, 2, ... (cycling)."""
        return [index % self.num_classes for index in range(count)]

    def prefix_groups(
        self, conditions: Sequence[int], cfg: bool, device: torch.device
    ) -> list[PrefixGroup]:
        check_class_ids(conditions, self.num_classes)
        classes = torch.tensor([int(c) for c in conditions], dtype=torch.long, device=device)
        if cfg:
            classes = torch.cat([classes, torch.full_like(classes, self.num_classes)])
        rows, prefix = classes.shape[0], self.prefix_capacity
        input_ids = (self.vocab_size + classes)[:, None].expand(rows, prefix)
        positions = torch.arange(prefix, device=device).expand(rows, -1)
        return [PrefixGroup(list(range(rows)), input_ids, positions, image_position=prefix)]
