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


SHARE = r"\d+ */ *\d+|\d*\.\d+|\d+\.\d*"  # 1/6, 0.25, 1.


def parse_budget(text: str, layout: SequenceLayout) -> int:
    """Budget in image tokens, at most the whole image."""
    spec = str(text).strip().lower()
    lines = re.fullmatch(r"(\d+)\s*lines?", spec)
    try:
        if lines:
            tokens = int(lines.group(1)) * layout.width
        elif re.fullmatch(r"\d+", spec):
            tokens = int(spec)
        elif re.fullmatch(SHARE, spec):  # no exponents: Fraction('1e-99999999') takes minutes
            share = Fraction(spec.replace(" ", ""))
            if not 0 < share <= 1:
                raise ValueError
            tokens = max(1, round(share * layout.height)) * layout.width
        else:
            raise ValueError
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--budget {text!r} is not understood; give {BUDGET_HELP}.") from None
    if tokens <= 0:
        raise UserError(f"--budget {text!r} keeps no image tokens; give 1 to "
                        f"{layout.image_tokens} tokens, or a share such as 1/4.")
    return min(tokens, layout.image_tokens)
