"""Parse a cache budget: `1/6` or `0.25` (share of the image, in lines), `96` tokens, `4lines`."""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import UserError
from ..models.configs import SequenceLayout

BUDGET_HELP = (
    "image tokens kept after each line: a share of the image such as 1/6 or 0.25 (rounded to "
    "whole lines, at least one), a token count such as 96, or whole lines such as 4lines"
)


def parse_budget(text: str, layout: SequenceLayout) -> int:
    """Budget in image tokens, at most the whole image."""
    spec = str(text).strip().lower()
    lines = re.fullmatch(r"(\d+)\s*lines?", spec)
    try:
        if lines:
            tokens = int(lines.group(1)) * layout.width
        elif re.fullmatch(r"\d+", spec):
            tokens = int(spec)
        else:
            share = Fraction(spec)
            if not 0 < share <= 1:
                raise ValueError
            tokens = max(1, round(share * layout.height)) * layout.width
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--budget '{text}' is not understood; give {BUDGET_HELP}.") from None
    if tokens <= 0:
        raise UserError(f"--budget '{text}' keeps no image tokens; give at least one line.")
    return min(tokens, layout.image_tokens)
