"""OrtEngine: same greedy images as PyTorch, IOBinding without per-step allocation, caching."""

from __future__ import annotations

import shutil

import pytest
import torch
from artifact_fixtures import built, model_for, one_torch_thread  # noqa: F401

from linear_export.engines import ENGINES, make_engine
from linear_export.engines import ort as ort_module
from linear_export.engines.cache import CacheShape, KVCache
from linear_export.engines.ort import OrtEngine
from linear_export.engines.torch import TorchEngine
from linear_export.errors import UserError
from linear_export.runtime.generate import generate
from linear_export.runtime.policies import Policy, PolicyConfig, fit_policy
from linear_export.runtime.sampling import SamplingConfig
from linear_export.runtime.verify import compare_engines, format_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"name": "GPT-tiny"}
GREEDY = SamplingConfig(cfg_scale=4.0, temperature=0.0)


def policies(layout) -> list[Policy]:
    return [Policy(PolicyConfig("full"), layout),
            Policy(PolicyConfig("linear", budget=2 * layout.width), layout)]


def test_registered_and_shaped_like_the_torch_engine() -> None:
    assert "ort" in ENGINES
    engine = make_engine("ort", artifact=built(**TINY))
    reference = TorchEngine(model_for())
    assert engine.name == "ort"
    for field in ("config", "layout", "dtype", "device"):
        assert getattr(engine, field) == getattr(reference, field), field
    with pytest.raises(UserError, match="--artifact"):
        make_engine("ort")


@pytest.mark.parametrize("policy_index", [0, 1], ids=["full", "linear"])
def test_greedy_tokens_identical_over_a_whole_image(policy_index: int) -> None:
    model, engine = model_for(), OrtEngine(built(**TINY))
    policy = policies(model.layout)[policy_index]
    want = generate(TorchEngine(model), [1, 7], policy, GREEDY)
    got = generate(engine, [1, 7], fit_policy(policy, engine.capacity), GREEDY)
    assert torch.equal(got.tokens, want.tokens)
    assert got.stats.evictions == want.stats.evictions == (3 if policy.name == "linear" else 0)
    assert len(set(want.tokens.flatten().tolist())) > 5  # not a degenerate constant image


def test_greedy_tokens_identical_at_the_exact_linear_capacity_per_layer() -> None:
    model = model_for()
    engine = OrtEngine(built("GPT-tiny", capacity=19, split_cache=True))
    policy = policies(model.layout)[1]
    assert policy.capacity == engine.capacity == 19
    want = generate(TorchEngine(model), [4, 5, 6], policy, GREEDY)
    got = generate(engine, [4, 5, 6], fit_policy(policy, engine.capacity), GREEDY)
    assert torch.equal(got.tokens, want.tokens)


def test_lockstep_comparison_passes_with_polygraphy() -> None:
    model, engine = model_for(), OrtEngine(built(**TINY))
    policy = fit_policy(policies(model.layout)[1], engine.capacity)
    report = compare_engines(TorchEngine(model), engine, policy, [2, 3], cfg_scale=4.0,
                             dtype_name="fp32")
    assert report.passed, format_report(report)
    assert report.steps == 36 and report.free_run_token_mismatches == 0
    assert report.outputs["logits"].steps == 36
    assert report.outputs["attn_mass"].max_abs < 1e-5
    # Every step also ran (and matched) the decode step, every scored line end the score graph.
    assert report.outputs["present_query (decode)"].steps == 36
    # A 2-line budget: lines 2, 3 and 4 end in an eviction (line 5's end is never reached).
    assert report.outputs["line_mass"].steps == 3
    table = format_report(report)
    assert "logits" in table and "FAIL" not in table


def test_score_positions_move_the_mass_as_in_torch() -> None:
    """The scored graph rotates attn_mass's queries to score_position_ids, as GPT.step does."""
    model, engine = model_for(), OrtEngine(built(**TINY))
    reference = TorchEngine(model)
    config, prefix, width = model.config, model.layout.prefix, model.layout.width
    cache = KVCache(CacheShape(config.n_layer, 2, config.kv_heads, engine.capacity,
                               config.head_dim), engine.dtype, engine.device)
    ids = torch.randint(0, config.vocab_size, (2, prefix + width + 1))
    ids[:, 0] = config.vocab_size + torch.tensor([1, 2])
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    out = reference.step(ids[:, :-1], positions[:, :-1], cache)
    cache.append(out.present_key, out.present_value, positions[0, :-1])
    step_ids, step_positions = ids[:, -1:], positions[:, -1:]
    ahead = torch.stack([step_positions + width, step_positions + 2 * width], dim=1)  # R = 2
    want = reference.step(step_ids, step_positions, cache, True, score_position_ids=ahead).attn_mass
    in_place = reference.step(step_ids, step_positions, cache, True).attn_mass
    got = engine.step(step_ids, step_positions, cache, True, score_position_ids=ahead).attn_mass
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - in_place).abs().max() > 1e-3  # the input matters


def test_outputs_are_preallocated_once_per_shape() -> None:
    engine = OrtEngine(built(**TINY))
    seen: dict[tuple, set] = {}

    class Recording:
        def __getattr__(self, name):
            return getattr(engine, name)

        def step(self, input_ids, position_ids, cache, need_scores=False, **extra):
            out = engine.step(input_ids, position_ids, cache, need_scores, **extra)
            key = (tuple(input_ids.shape), out.attn_mass is not None)
            pointers = (out.logits.data_ptr(), out.present_key.data_ptr(),
                        out.present_value.data_ptr())
            seen.setdefault(key, set()).add(pointers)
            return out

    policy = fit_policy(policies(engine.layout)[1], engine.capacity)
    generate(Recording(), [1, 2], policy, GREEDY)
    assert all(len(pointers) == 1 for pointers in seen.values()), seen
    assert len(engine._bindings) == len(seen) <= 2  # (scored, decode) at B=4, T=1


def test_batch_and_capacity_checks() -> None:
    engine = OrtEngine(built(**TINY))
    config = engine.config
    shape = CacheShape(config.n_layer, 9, config.kv_heads, engine.capacity, config.head_dim)
    ids, positions = torch.zeros(9, 1, dtype=torch.long), torch.ones(9, 1, dtype=torch.long)
    with pytest.raises(UserError, match="--max-batch 8"):
        engine.step(ids, positions, KVCache(shape, torch.float32))
    small = CacheShape(config.n_layer, 2, config.kv_heads, engine.capacity - 1, config.head_dim)
    with pytest.raises(ValueError, match="capacity"):
        engine.step(ids[:2], positions[:2], KVCache(small, torch.float32))
    full = Policy(PolicyConfig("full"), engine.layout)
    with pytest.raises(UserError, match="--policy full needs 37"):
        fit_policy(full, 19)
    linear = Policy(PolicyConfig("linear", budget=18), engine.layout)
    with pytest.raises(UserError, match="--budget 18"):
        fit_policy(linear, 19)
    fitted = fit_policy(policies(engine.layout)[1], 37)
    assert fitted.capacity == 37 and fitted.budget == 12 and fitted.needed == 19


def test_optimized_model_is_cached_beside_the_artifact(tmp_path, monkeypatch) -> None:
    directory = tmp_path / "artifact"
    shutil.copytree(built(**TINY), directory, ignore=shutil.ignore_patterns(".ort"))
    OrtEngine(directory)
    cached = sorted((directory / ".ort").glob("*/model.onnx"))
    assert len(cached) == 2  # step_decode and score; the scored step loads when first run
    loaded = []
    real = ort_module.ort.InferenceSession

    def recording(path, *args, **kwargs):
        loaded.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort_module.ort, "InferenceSession", recording)
    OrtEngine(directory)
    assert sorted(loaded) == sorted(str(path) for path in cached)
    # A newer source makes the cache stale: the engine goes back to the artifact's graph.
    (directory / "step_decode.onnx").touch()
    loaded.clear()
    OrtEngine(directory)
    assert str(directory / "step_decode.onnx") in loaded


def skewed_head_budgets(model) -> torch.Tensor:
    """[5, L, 2] for the 6 x 6 grid at a 2-line budget: after lines 2-4, kv head 0 keeps
    15, 18, 14 image tokens and head 1 keeps 9, 6, 10 (the layer's 24 in all)."""
    table = torch.full((5, model.config.n_layer, 2), 12)
    table[0] = 6
    table[2:, :, 0] = torch.tensor([15, 18, 14])[:, None]
    table[2:, :, 1] = torch.tensor([9, 6, 10])[:, None]
    return table


def test_head_shared_artifact_runs_per_head_budgets_as_torch_does() -> None:
    model = model_for("GPT-tiny-gqa")
    engine = OrtEngine(built("GPT-tiny-gqa", capacity=25, split_cache=True,
                             head_shared=True))
    assert engine.artifact.head_shared and engine.artifact.manifest["schema_version"] == 6
    assert engine.artifact.manifest["build"]["attention"] == "gqa"  # the fused kernel
    layout = model.layout
    pooled = Policy(PolicyConfig("linear", budget=12, head_budgets=skewed_head_budgets(model)),
                    layout)
    plain = Policy(PolicyConfig("linear", budget=12), layout)
    # A row holds one kv head's slots: the largest count (18) plus the prefix and a line.
    assert pooled.capacity == engine.capacity == 25 and plain.capacity == 19
    truth = torch.randint(0, model.config.vocab_size, (3, 6, 6))
    teacher = SamplingConfig(cfg_scale=1.0)
    # A plain cache runs on it too, every head holding cache_len slots.
    for policy in (pooled, fit_policy(plain, engine.capacity)):
        want = generate(TorchEngine(model), [1, 2, 3], policy, teacher, teacher_tokens=truth)
        got = generate(engine, [1, 2, 3], policy, teacher, teacher_tokens=truth)
        assert got.stats.evictions == want.stats.evictions == 3
        torch.testing.assert_close(torch.tensor(got.stats.nll_per_image),
                                   torch.tensor(want.stats.nll_per_image), atol=1e-5, rtol=0)
        want = generate(TorchEngine(model), [4, 5], policy, GREEDY)
        assert torch.equal(generate(engine, [4, 5], policy, GREEDY).tokens, want.tokens)
    uniform = generate(TorchEngine(model), [1, 2, 3], plain, teacher, teacher_tokens=truth)
    skewed = generate(TorchEngine(model), [1, 2, 3], pooled, teacher, teacher_tokens=truth)
    assert abs(uniform.stats.nll_per_token - skewed.stats.nll_per_token) > 1e-4


def test_plain_artifact_refuses_per_head_budgets() -> None:
    model, engine = model_for(), OrtEngine(built(**TINY))
    table = torch.full((5, model.config.n_layer, model.config.kv_heads), 12)
    table[0] = 6
    pooled = Policy(PolicyConfig("linear", budget=12, head_budgets=table), model.layout)
    with pytest.raises(UserError, match="built without --head-budgets"):
        generate(engine, [1], fit_policy(pooled, engine.capacity), GREEDY)
