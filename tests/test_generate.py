"""The host loop: `full` reproduces full attention; a whole-image `linear` budget equals `full`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linear_export.engines.torch import TorchEngine
from linear_export.errors import UserError
from linear_export.evaluation.oracle import masked_nll
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


def head_budget_table(layers: int, heads: int, skewed: bool) -> torch.Tensor:
    """[5, L, Hkv] for a 6 x 4 grid at a budget of 8 tokens: lines 0-1 keep all, then 8 per
    head, or (skewed) head 0 keeps 11, 12, 9 and head 1 keeps 5, 4, 7."""
    table = torch.full((5, layers, heads), 8)
    table[0] = 4
    if skewed:
        table[2:, :, 0] = torch.tensor([11, 12, 9])[:, None]
        table[2:, :, 1] = torch.tensor([5, 4, 7])[:, None]
    return table


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_head_shared_pool_with_equal_budgets_is_the_plain_cache(cfg_scale: float) -> None:
    model = tiny_model("GPT-tiny-gqa", height=6, width=4)
    config, engine = model.config, TorchEngine(model)
    table = head_budget_table(config.n_layer, config.kv_heads, skewed=False)
    truth = torch.randint(0, config.vocab_size, (3, 6, 4))
    sampling = SamplingConfig(cfg_scale=cfg_scale)
    plain = generate(engine, [1, 2, 3], policy("linear", model.layout, 8, recent_lines=1),
                     sampling, teacher_tokens=truth)
    pooled_policy = policy("linear", model.layout, 8, recent_lines=1, head_budgets=table,
                           lookahead=3)  # the plain cache's default
    assert pooled_policy.head_shared and pooled_policy.capacity == plain.stats.kv_capacity
    pooled = generate(engine, [1, 2, 3], pooled_policy, sampling, teacher_tokens=truth)
    assert pooled.stats.evictions == plain.stats.evictions == 3
    np.testing.assert_allclose(pooled.stats.nll_per_image, plain.stats.nll_per_image,
                               atol=1e-5, rtol=0)


def test_head_shared_pool_keeps_each_heads_count_and_attends_to_what_it_holds() -> None:
    """The runtime's NLL equals a plain forward pass in which each (layer, kv head) sees only
    the keys that, by the cache after each line, its own slots still hold."""
    model = tiny_model("GPT-tiny-gqa", height=6, width=4)
    config, layout = model.config, model.layout
    table = head_budget_table(config.n_layer, config.kv_heads, skewed=True)
    labels, truth = [1, 2, 3], torch.randint(0, config.vocab_size, (3, 6, 4))
    held_after = {}

    def record(line, cache):
        index = cache.positions[..., :cache.cache_len]  # each row is one kv head's; -1: dead
        held = torch.zeros(*index.shape[:3], layout.length, dtype=torch.long)
        held.scatter_add_(-1, index.clamp(min=0), (index >= 0).long())
        held_after[line] = held > 0  # [L, B, Hkv, length]

    result = generate(TorchEngine(model), labels,
                      policy("linear", layout, 8, recent_lines=1, head_budgets=table),
                      SamplingConfig(cfg_scale=1.0), teacher_tokens=truth, on_line_end=record)
    visible = torch.ones(layout.length, layout.length, dtype=torch.bool).tril().repeat(
        config.n_layer, len(labels), config.kv_heads, 1, 1)
    for line, held in sorted(held_after.items()):
        assert torch.equal(held[..., 1:].sum(-1), table[line][:, None].expand_as(held[..., 0]))
        first_query = layout.prefix + (line + 1) * layout.width
        visible[..., first_query:, :first_query] &= held[..., None, :first_query]
    masked = masked_nll(model, truth.flatten(1), labels, visible)
    np.testing.assert_allclose(result.stats.nll_per_image, masked.tolist(), atol=1e-5, rtol=0)
    uniform = generate(TorchEngine(model), labels, policy("linear", layout, 8, recent_lines=1),
                       SamplingConfig(cfg_scale=1.0), teacher_tokens=truth)
    assert abs(uniform.stats.nll_per_token - result.stats.nll_per_token) > 1e-4


def test_head_budgets_are_checked_against_the_policy() -> None:
    model = tiny_model("GPT-tiny-gqa", height=6, width=4)
    table = head_budget_table(model.config.n_layer, model.config.kv_heads, skewed=True)
    with pytest.raises(UserError, match="calibrate them again"):
        policy("linear", model.layout, 12, recent_lines=1, head_budgets=table)
    with pytest.raises(UserError, match="shape"):
        policy("linear", model.layout, 8, recent_lines=1, head_budgets=table[1:])
    with pytest.raises(UserError, match="granularity head"):
        policy("h2o", model.layout, 8, head_budgets=table)


def test_per_condition_seeds_make_an_image_independent_of_its_batch() -> None:
    model = tiny_model()
    sampling = SamplingConfig(cfg_scale=3.0, temperature=1.0, top_k=0)
    chosen = policy("full", model.layout)
    together = generate(TorchEngine(model), [1, 4, 7], chosen, sampling, seed=[11, 12, 13])
    alone = generate(TorchEngine(model), [4], chosen, sampling, seed=[12])
    assert torch.equal(together.tokens[1], alone.tokens[0])
    other = generate(TorchEngine(model), [4], chosen, sampling, seed=[99])
    assert not torch.equal(other.tokens[0], alone.tokens[0])
    with pytest.raises(ValueError, match="one per condition"):
        generate(TorchEngine(model), [1, 4], chosen, sampling, seed=[1])


def test_on_line_reports_each_finished_line_once_in_order() -> None:
    model = tiny_model()
    seen = []
    generate(TorchEngine(model), [1], policy("linear", model.layout, budget=8),
             SamplingConfig(cfg_scale=2.0), on_line=lambda line, lines: seen.append((line, lines)))
    height = model.layout.height
    assert seen == [(line, height) for line in range(height)]
