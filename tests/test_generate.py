"""The host loop: `full` reproduces full attention; a whole-image `linear` budget equals `full`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linear_export.engines.torch import TorchEngine
from linear_export.errors import UserError
from linear_export.models.configs import SequenceLayout
from linear_export.runtime.generate import generate
from linear_export.runtime.policies import Policy, PolicyConfig
from linear_export.runtime.sampling import SamplingConfig

from conftest import tiny_model


class RecordingEngine(TorchEngine):
    """TorchEngine that records each step's logits and the cache occupancy it saw."""

    def __init__(self, model):
        super().__init__(model)
        self.logits, self.cache_lens = [], []

    def step(self, input_ids, position_ids, cache, need_scores=True, **extra):
        out = super().step(input_ids, position_ids, cache, need_scores, **extra)
        self.logits.append(out.logits.clone())
        self.cache_lens.append((cache.cache_len, cache.capacity))
        return out


def policy(name: str, layout: SequenceLayout, budget: int | None = None, **knobs) -> Policy:
    return Policy(PolicyConfig(name, budget=budget, **knobs), layout)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("name", ["GPT-tiny", "GPT-tiny-gqa"])
def test_full_policy_reproduces_full_attention(name: str, cfg_scale: float) -> None:
    model = tiny_model(name)
    engine = RecordingEngine(model)
    classes = [1, 4, 7]
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=1.0, top_k=0)
    result = generate(engine, classes, policy("full", model.layout), sampling, seed=5)
    tokens = result.tokens.flatten(1)
    vocab, null = model.config.vocab_size, model.config.null_class
    rows = [vocab + c for c in classes] + ([vocab + null] * 3 if cfg_scale > 1 else [])
    sequence = torch.cat([torch.tensor(rows)[:, None], tokens.repeat(len(rows) // 3, 1)], 1)
    with torch.no_grad():
        reference = model(sequence[:, :-1])  # teacher-forced, plain full attention
    recorded = torch.stack(engine.logits, dim=1)
    torch.testing.assert_close(recorded, reference, atol=1e-4, rtol=0)
    assert result.stats.kv_capacity == model.layout.length
    assert result.stats.evictions == 0


def test_greedy_tokens_match_reference_argmax() -> None:
    model = tiny_model()
    result = generate(TorchEngine(model), [2, 3], policy("full", model.layout),
                      SamplingConfig(cfg_scale=1.0, temperature=0), seed=0)
    tokens = result.tokens.flatten(1)
    prefix = torch.tensor([[model.config.vocab_size + 2], [model.config.vocab_size + 3]])
    with torch.no_grad():
        reference = model(torch.cat([prefix, tokens[:, :-1]], 1))
    assert torch.equal(reference.argmax(-1), tokens)


def test_linear_with_whole_image_budget_equals_full_exactly() -> None:
    model = tiny_model()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=5)
    full = generate(TorchEngine(model), [1, 2], policy("full", model.layout), sampling, seed=3)
    linear = generate(TorchEngine(model), [1, 2],
                      policy("linear", model.layout, budget=model.layout.image_tokens),
                      sampling, seed=3)
    assert torch.equal(full.tokens, linear.tokens)


@pytest.mark.parametrize("name", ["linear", "h2o", "streaming", "window"])
def test_evicting_policies_stay_within_capacity(name: str) -> None:
    model = tiny_model(height=6, width=4)
    engine = RecordingEngine(model)
    chosen = policy(name, model.layout, budget=8, sinks=1)
    result = generate(engine, [0, 5], chosen, SamplingConfig(cfg_scale=2.0), seed=1)
    assert result.tokens.shape == (2, 6, 4)
    assert result.stats.kv_capacity == 1 + 8 + 4
    assert all(length <= capacity == 13 for length, capacity in engine.cache_lens)
    # After the first eviction, each line starts from exactly prefix + budget slots.
    line_starts = [engine.cache_lens[1 + line * 4][0] for line in range(3, 6)]
    assert line_starts == [1 + 8] * 3
    # Lines 2, 3 and 4 end over budget; the last line is never fully cached.
    assert result.stats.evictions == 3
    assert result.stats.kv_bytes * 25 == result.stats.full_kv_bytes * 13  # capacity 13 vs 25


def test_seeded_generation_is_deterministic_and_seed_sensitive() -> None:
    model = tiny_model()
    chosen = policy("linear", model.layout, budget=8)
    sampling = SamplingConfig(cfg_scale=2.0, top_k=0)
    first = generate(TorchEngine(model), [1, 2], chosen, sampling, seed=11).tokens
    again = generate(TorchEngine(model), [1, 2], chosen, sampling, seed=11).tokens
    other = generate(TorchEngine(model), [1, 2], chosen, sampling, seed=12).tokens
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_class_out_of_range_and_nan_logits() -> None:
    model = tiny_model()
    with pytest.raises(UserError, match="out of range"):
        generate(TorchEngine(model), [10], policy("full", model.layout), SamplingConfig())
    broken = tiny_model()
    with torch.no_grad():
        broken.output.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="NaN/Inf"):
        generate(TorchEngine(broken), [1], policy("full", broken.layout), SamplingConfig())


def test_teacher_forced_nll_matches_full_forward() -> None:
    model = tiny_model()
    truth = torch.randint(0, model.config.vocab_size, (2, 4, 4))
    lines = []
    result = generate(TorchEngine(model), [1, 6], policy("full", model.layout),
                      SamplingConfig(cfg_scale=1.0), teacher_tokens=truth,
                      on_line_end=lambda line, cache: lines.append((line, cache.cache_len)))
    prefix = torch.tensor([[model.config.vocab_size + 1], [model.config.vocab_size + 6]])
    sequence = torch.cat([prefix, truth.flatten(1)], 1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(sequence[:, :-1]), -1)
    per_token = -log_probs.gather(2, truth.flatten(1)[..., None])[..., 0]
    assert abs(result.stats.nll_per_token - per_token.mean().item()) < 1e-5
    assert np.allclose(result.stats.nll_per_image, per_token.mean(1).tolist(), atol=1e-5)
    assert lines == [(0, 1 + 4), (1, 1 + 8), (2, 1 + 12)]
