"""The position prior: where a model's later lines read on average, per kv head.

LineAR ranks the cached keys by what the just-finished line's queries, rotated a few lines
ahead, read. In some heads what later lines read is set more by position than by content
(the demo's layer 2 head 0 reads the same places in every image); there the average over
calibration images predicts better than the rotated queries. Each head gets a weight for the
prior (0: LineAR's scores alone), chosen on the calibration images in two steps:

1. proxy: for each weight of `WEIGHTS`, how much of the later lines' attention the keys each
   head keeps would catch, under the head budgets and the same sequential evictions as the
   runtime; each head's best weight is its candidate;
2. check: a head's candidate is kept only if it lowers the teacher-forced NLL of the
   calibration images with the kept keys masked (`masked_nll`), one head at a time.

The emulation scores with the full cache's attention and without guidance, so it only
approximates the runtime; the check keeps it from adopting a weight that does not pay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..models.gpt import GPT
from ..runtime.policies import Policy
from .oracle import evict_by_line, future_attention, line_scores, masked_nll

# Candidate weights per head; 1e6 ranks by the prior alone (LineAR's scores break ties).
WEIGHTS = (0.25, 1.0, 4.0, 1e6)


@dataclass
class _Batch:
    tokens: torch.Tensor
    labels: list[int]
    later: torch.Tensor  # [L, B, Hkv, lines - 1, N]: later lines' attention after line f
    scores: torch.Tensor  # [L, B, Hkv, lines, N]: LineAR's scores at each line end


@dataclass
class PositionPrior:
    prior: torch.Tensor  # [lines - 1, L, Hkv, image tokens], each row sums to 1
    weight: torch.Tensor  # [L, Hkv]
    nll_before: float  # emulated NLL per token of the calibration images, weights 0
    nll_after: float  # ... with the chosen weights


def calibrate_position_prior(model: GPT, tokens: torch.Tensor, labels: list[int],
                             policy: Policy, batch_size: int = 8,
                             on_batch: Callable[[int], None] | None = None) -> PositionPrior:
    """The prior and per-head weights for `policy` (LineAR with its head budgets) from
    images `tokens` [B, h, w] of classes `labels`. Holds both attention maps of every image:
    L x B x Hkv x lines x N floats, twice."""
    layout = policy.layout
    if policy.config.head_budgets is None:
        raise ValueError("the position prior is calibrated under head budgets")
    batches = []
    prior = torch.zeros(layout.height - 1, model.config.n_layer, model.config.kv_heads,
                        layout.image_tokens, dtype=torch.float64)
    for start in range(0, len(labels), batch_size):
        chunk = slice(start, start + batch_size)
        future = future_attention(model, tokens[chunk], labels[chunk])
        # Lines f + 1 .. last, for each line end f: a reversed cumulative sum.
        later = future.flip(3).cumsum(3).flip(3)[:, :, :, 1:]
        batches.append(_Batch(tokens[chunk], labels[chunk], later,
                              line_scores(model, tokens[chunk], labels[chunk], policy)))
        image_keys = later[..., layout.prefix:layout.prefix + layout.image_tokens]
        prior += image_keys.sum(1).permute(2, 0, 1, 3).double()
        if on_batch is not None:
            on_batch(len(labels[chunk]))
    prior = (prior / prior.sum(-1, keepdim=True).clamp(min=1e-12)).float()
    heads = prior.shape[1:3]

    def weighted(weight: torch.Tensor) -> Policy:
        return Policy(replace(policy.config, position_prior=prior, prior_weight=weight), layout)

    # 1. proxy: each head's best weight by the later attention its kept keys catch
    caught = torch.stack([_caught(weighted(torch.full(heads, weight)), batches)
                          for weight in (0.0, *WEIGHTS)])
    candidate = torch.tensor((0.0, *WEIGHTS))[caught.argmax(0)]
    # 2. check: keep a head's candidate only where the emulated NLL drops
    chosen = torch.zeros(heads)
    before = best = _emulated_nll(model, weighted(chosen), batches)
    for layer, head in candidate.nonzero().tolist():
        trial = chosen.clone()
        trial[layer, head] = candidate[layer, head]
        nll = _emulated_nll(model, weighted(trial), batches)
        if nll < best:
            chosen, best = trial, nll
    return PositionPrior(prior, chosen, before, best)


def _ranker(policy: Policy, batch: _Batch) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The policy's own priority at each line end, over the keys still cached."""
    length = policy.layout.length

    def rank(finished: int, cached: torch.Tensor) -> torch.Tensor:
        scores = batch.scores[:, :, :, finished, :length] * cached
        positions = torch.arange(length).expand_as(scores)
        return policy.priority(positions, scores, finished, cfg=False)

    return rank


def _caught(policy: Policy, batches: list[_Batch]) -> torch.Tensor:
    """[L, Hkv]: later lines' attention on the keys each head keeps, summed over line ends
    and images (the keys always kept count too, the same for every weight)."""
    layout = policy.layout
    total = 0
    for batch in batches:
        visible = evict_by_line(_ranker(policy, batch), policy, policy.config.head_budgets,
                                batch.later.shape[:3])
        for finished in range(layout.height - 1):
            query = layout.prefix + (finished + 1) * layout.width  # first of the next line
            if query >= layout.length:
                break
            kept = visible[..., query, :query].float()
            total = total + (batch.later[:, :, :, finished, :query] * kept).sum((1, -1))
    return total


def _emulated_nll(model: GPT, policy: Policy, batches: list[_Batch]) -> float:
    """Mean teacher-forced NLL per token with each head's evicted keys masked."""
    per_image = [masked_nll(model, batch.tokens, batch.labels,
                            evict_by_line(_ranker(policy, batch), policy,
                                          policy.config.head_budgets, batch.later.shape[:3]))
                 for batch in batches]
    return float(torch.cat(per_image).mean()) if per_image else math.nan
