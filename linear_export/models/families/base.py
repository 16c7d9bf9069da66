"""The model-family adapter: everything the runtime and exporter need to know about a family.

A family's step model keeps the DESIGN.md contract; the adapter says how to form its prefix
(and CFG rows), where the image region starts, how wide a line is (end-of-line tokens
included) and which input id feeds an image code. Step models output logits over image
codes only, so sampling and guidance never see a family's text vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ...errors import UserError
from ..configs import SequenceLayout


@dataclass
class PrefixGroup:
    """Rows that share one prefix length, and what their prefill step is fed.

    Rows of different prefix lengths run as separate groups (each with its own cache), so
    every cache keeps a uniform `cache_len`.
    """

    rows: list[int]  # indices into the global row order [cond; uncond]
    input_ids: torch.Tensor  # [R, P] int64 (ignored where inputs_embeds is given)
    position_ids: torch.Tensor  # [R, P] int64, the model's positions of the prefix
    image_position: int  # model position of the first image-region token
    inputs_embeds: torch.Tensor | None = None  # [R, P, dim]: a prefix that is no token

    @property
    def prefix(self) -> int:
        return self.input_ids.shape[1]


@dataclass(frozen=True)
class Family:
    """Base adapter; subclasses implement `prefix_groups` for their kind of condition."""

    name: str
    prefix_capacity: int  # most prefix tokens one row may hold (the cache's P)
    image_offset: int = 0  # image code c is fed to the step as input id image_offset + c
    line_extra: int = 0  # tokens per line after the image codes (Lumina: one end-of-line)
    eol_id: int | None = None  # the forced token of those extra slots

    def line_width(self, width: int) -> int:
        """Tokens per image line, end-of-line tokens included."""
        return width + self.line_extra

    def token_layout(self, layout: SequenceLayout, prefix: int | None = None) -> SequenceLayout:
        """The sequence as the cache and policies see it: P prefix tokens, h lines of w + extra."""
        return SequenceLayout(prefix=layout.prefix if prefix is None else prefix,
                              height=layout.height, width=self.line_width(layout.width))

    def feed_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Step input ids of image codes."""
        return codes + self.image_offset if self.image_offset else codes

    def forced_token(self, column: int, width: int) -> int | None:
        """The token at `column` of a line that is fixed rather than sampled (end of line)."""
        return self.eol_id if column >= width else None

    def check_prefix(self, length: int, what: str) -> None:
        if length > self.prefix_capacity:
            raise UserError(f"{what} is {length} tokens long, more than the prefix capacity of "
                            f"{self.prefix_capacity} tokens; shorten the prompt or raise "
                            "--max-prompt-tokens.")
        if length < 1:
            raise UserError(f"{what} is empty; give a non-empty prompt.")

    def prefix_groups(
        self, conditions: Sequence, cfg: bool, device: torch.device
    ) -> list[PrefixGroup]:
        """Prefill inputs for rows [cond; uncond], grouped by prefix length."""
        raise NotImplementedError

    def prompt_capacity(self) -> int:
        """Most tokens a prompt may have (the prefix less the family's own context tokens)."""
        return self.prefix_capacity

    def example_conditions(self, count: int, seed: int = 0) -> list:
        """Seeded conditions for verify and bench: token prompts of two lengths (two groups).

        Ids lie in [1, image_offset), the text vocabulary of token-prompt families.
        """
        if self.image_offset < 2:
            raise NotImplementedError(f"{type(self).__name__} takes no token prompts")
        generator = torch.Generator().manual_seed(seed)
        longest = min(self.prompt_capacity(), 8)
        return [torch.randint(1, self.image_offset, (max(1, longest - index % 2),),
                              generator=generator).tolist() for index in range(count)]

    def to_json(self) -> dict:
        return {"kind": type(self).__name__, **asdict(self)}


def group_by_length(
    prefixes: list[list[int]], positions: list[list[int]], image_positions: list[int],
    device: torch.device,
) -> list[PrefixGroup]:
    """Token prefixes (one per row) grouped by length, each group keeping its rows' order."""
    by_length: dict[tuple[int, int], list[int]] = {}
    for row, tokens in enumerate(prefixes):
        by_length.setdefault((len(tokens), image_positions[row]), []).append(row)
    groups = []
    for (_, image_position), rows in by_length.items():
        ids = torch.tensor([prefixes[row] for row in rows], dtype=torch.long, device=device)
        pos = torch.tensor([positions[row] for row in rows], dtype=torch.long, device=device)
        groups.append(PrefixGroup(rows, ids, pos, image_position))
    return groups
