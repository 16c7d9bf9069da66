"""Budget strings: shares round to whole lines, plain integers are tokens, NNlines are lines."""

from __future__ import annotations

import pytest

from linear_export.errors import UserError
from linear_export.models.configs import SequenceLayout
from linear_export.runtime.budget import parse_budget

GRID_16 = SequenceLayout(prefix=1, height=16, width=16)
GRID_24 = SequenceLayout(prefix=1, height=24, width=24)


@pytest.mark.parametrize(
    ("text", "layout", "tokens"),
    [
        ("1/4", GRID_16, 64),  # 4 lines of 16
        ("0.25", GRID_16, 64),
        ("1/6", GRID_24, 96),  # the paper: LlamaGen-XL 384 px, 1/6 -> 4 lines
        ("1/6", GRID_16, 48),  # 2.67 lines rounds to 3
        ("1/8", GRID_16, 32),
        ("1/100", GRID_16, 16),  # at least one line
        ("96", GRID_24, 96),
        ("4lines", GRID_24, 96),
        ("2 lines", GRID_16, 32),
        ("1", GRID_16, 1),  # a plain integer is tokens
        ("1.0", GRID_16, 256),
        ("9999", GRID_16, 256),  # capped at the whole image
    ],
)
def test_forms(text: str, layout: SequenceLayout, tokens: int) -> None:
    assert parse_budget(text, layout) == tokens


@pytest.mark.parametrize("text", ["abc", "1/0", "-3", "1.5", "0", "0lines", "0.0", ""])
def test_bad_budgets_are_user_errors(text: str) -> None:
    with pytest.raises(UserError, match="budget"):
        parse_budget(text, GRID_16)
