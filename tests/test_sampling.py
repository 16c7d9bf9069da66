"""CFG and sampling filters against brute-force definitions."""

from __future__ import annotations

import pytest
import torch

from linear_export.errors import UserError
from linear_export.runtime.sampling import SamplingConfig, filter_top_k_top_p, guide, sample


def test_guide_mixes_cond_and_uncond_halves() -> None:
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 4.0), uncond + 4 * (cond - uncond))


def test_top_k_keeps_values_at_least_the_kth_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0]])
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, True, True, True, False]]  # ties with the 2nd stay


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.randn(4, 50)
    for top_p in (0.1, 0.5, 0.9):
        kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=top_p))
        probs = torch.softmax(logits, -1)
        for row in range(4):
            order = probs[row].argsort(descending=True).tolist()
            total, nucleus = 0.0, []
            for index in order:  # add tokens until the ones before already cover top_p
                if total > top_p:
                    break
                nucleus.append(index)
                total += probs[row, index].item()
            assert sorted(torch.nonzero(kept[row]).flatten().tolist()) == sorted(nucleus)


def test_sampling_is_seeded_and_respects_filters() -> None:
    logits = torch.randn(6, 100)
    config = SamplingConfig(top_k=3, temperature=1.0)
    first = sample(logits, config, torch.Generator().manual_seed(1))
    again = sample(logits, config, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    top3 = logits.topk(3).indices
    assert all(first[row] in top3[row] for row in range(6))
    greedy = sample(logits, SamplingConfig(temperature=0), None)
    assert torch.equal(greedy, logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs", [{"cfg_scale": -1}, {"temperature": -0.5}, {"top_k": -1}, {"top_p": 0.0}]
)
def test_bad_sampling_settings(kwargs) -> None:
    with pytest.raises(UserError):
        SamplingConfig(**kwargs)


def test_top_k_draws_follow_the_renormalised_top_k_distribution() -> None:
    """Drawing among the k largest (the fast path) has the masked distribution's law."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.5, -3.0, 0.0]]).repeat(20000, 1)
    draws = sample(logits, SamplingConfig(top_k=3), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).float() / len(draws)
    top = torch.tensor([2.0, 0.5, 1.5])
    expected = torch.zeros(6)
    expected[[0, 2, 3]] = torch.softmax(top, dim=0)  # brute force: renormalised over the top 3
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize("top_k", [0, 5])
def test_one_generator_per_row_makes_each_draw_independent_of_the_batch(top_k: int) -> None:
    logits = torch.randn(4, 50)
    config = SamplingConfig(top_k=top_k, temperature=1.0)
    batched = sample(logits, config, [torch.Generator().manual_seed(10 + i) for i in range(4)])
    alone = [sample(logits[i:i + 1], config, [torch.Generator().manual_seed(10 + i)])
             for i in (2, 0, 3, 1)]
    assert batched.tolist() == [alone[1][0], alone[3][0], alone[0][0], alone[2][0]]
