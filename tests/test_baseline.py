"""The baseline loop (LlamaGen's static full cache) agrees with the host loop's `full` policy."""

from __future__ import annotations

import pytest
import torch

from linear_export.engines.torch import TorchEngine
from linear_export.runtime.baseline import BaselineLoop
from linear_export.runtime.generate import generate
from linear_export.runtime.policies import Policy, PolicyConfig
from linear_export.runtime.sampling import SamplingConfig

from conftest import tiny_model


class RecordingEngine(TorchEngine):
    def __init__(self, model):
        super().__init__(model)
        self.logits: list[torch.Tensor] = []

    def step(self, input_ids, position_ids, cache, need_scores=True, **extra):
        out = super().step(input_ids, position_ids, cache, need_scores, **extra)
        self.logits.append(out.logits.clone())
        return out


class RecordingBaseline(BaselineLoop):
    def __init__(self, model):
        super().__init__(model)
        self.logits: list[torch.Tensor] = []

    def step(self, input_ids, input_pos):
        logits = super().step(input_ids, input_pos)
        self.logits.append(logits.clone())
        return logits


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", ["GPT-tiny", "GPT-tiny-gqa"])
def test_greedy_baseline_matches_full_policy(name: str, cfg_scale: float) -> None:
    model = tiny_model(name)
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=0)
    engine, baseline = RecordingEngine(model), RecordingBaseline(model)
    classes = [1, 4, 7]
    reference = generate(engine, classes, Policy(PolicyConfig("full"), model.layout), sampling)
    result = baseline.generate(classes, sampling)
    assert torch.equal(result.tokens, reference.tokens)
    torch.testing.assert_close(torch.stack(baseline.logits), torch.stack(engine.logits),
                               atol=1e-4, rtol=0)


def test_sampled_tokens_match_with_same_seed() -> None:
    model = tiny_model()
    sampling = SamplingConfig(cfg_scale=4.0, temperature=1.0, top_k=20)
    reference = generate(TorchEngine(model), [2, 3], Policy(PolicyConfig("full"), model.layout),
                         sampling, seed=11)
    result = BaselineLoop(model).generate([2, 3], sampling, seed=11)
    assert torch.equal(result.tokens, reference.tokens)


def test_static_cache_is_rounded_up_to_eight_slots() -> None:
    model = tiny_model()  # P + N = 17 slots
    result = BaselineLoop(model).generate([5], SamplingConfig(cfg_scale=4.0, temperature=0))
    config = model.config
    assert result.kv_capacity == 24
    assert result.kv_bytes == 2 * config.n_layer * 2 * config.kv_heads * 24 * config.head_dim * 4
    assert len(result.step_seconds) == model.layout.image_tokens - 1 and result.seconds > 0
