"""Janus-Pro (transformers' Janus classes): the step contract against the library's forward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from family_fixtures import OnnxStepEngine, export_family_graphs, tiny_janus  # noqa: E402

from linear_export.engines.torch import TorchEngine  # noqa: E402
from linear_export.errors import UserError  # noqa: E402
from linear_export.models.configs import SequenceLayout  # noqa: E402
from linear_export.models.families.janus import JanusStep  # noqa: E402
from linear_export.runtime.generate import generate  # noqa: E402
from linear_export.runtime.policies import Policy, PolicyConfig  # noqa: E402
from linear_export.runtime.sampling import SamplingConfig  # noqa: E402
from linear_export.runtime.verify import TOLERANCES, LockstepEngine  # noqa: E402

LAYOUT = SequenceLayout(prefix=10, height=4, width=3)
PROMPTS = [[1, 20, 21, 22, 9], [1, 30, 31, 32, 9]]  # BOS ... image-start
GREEDY_CFG = SamplingConfig(cfg_scale=3.0, temperature=0, top_k=0)


@pytest.fixture(scope="module")
def pair():
    hf = tiny_janus()
    return hf, JanusStep(hf, LAYOUT)


def library_logits(hf, prompt: list[int], codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced: the prompt's text embeddings, then the codes' generation embeddings."""
    with torch.no_grad():
        text = hf.get_input_embeddings()(torch.tensor([prompt]))
        image = hf.prepare_embeddings_for_image_generation(codes.reshape(1, -1))
        hidden = hf.model.language_model(inputs_embeds=torch.cat([text, image], 1))
        return hf.model.generation_head(hidden.last_hidden_state)[0].float()


def test_full_policy_reproduces_the_library_forward(pair):
    hf, step = pair
    teacher = torch.randint(0, step.config.vocab_size, (2, LAYOUT.height, LAYOUT.width),
                            generator=torch.Generator().manual_seed(1))
    policy = Policy(PolicyConfig(name="full"), step.family.token_layout(LAYOUT))
    seen: dict[int, torch.Tensor] = {}
    generate(TorchEngine(step), PROMPTS, policy, GREEDY_CFG, teacher_tokens=teacher,
             on_step=lambda index, logits: seen.__setitem__(index, logits.clone()))
    pad = hf.config.text_config.pad_token_id
    uncond = [p[:1] + [pad] * (len(p) - 2) + p[-1:] for p in PROMPTS]
    for row, prompt in enumerate(PROMPTS + uncond):
        expected = library_logits(hf, prompt, teacher[row % 2])
        got = torch.stack([seen[index][row] for index in range(LAYOUT.image_tokens)])
        want = expected[len(prompt) - 1: len(prompt) - 1 + LAYOUT.image_tokens]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class PositionSpy:
    """Passes every step through to a real engine and records the position ids it was given."""

    def __init__(self, engine):
        self.engine, self.positions = engine, []
        for name in ("name", "config", "layout", "dtype", "device", "family"):
            setattr(self, name, getattr(engine, name))

    def step(self, input_ids, position_ids, cache, need_scores=False, **extra):
        self.positions.append(position_ids.expand_as(input_ids)[:, -1].tolist())
        return self.engine.step(input_ids, position_ids, cache, need_scores, **extra)

    def score_line(self, line_query, score_shifts, cache):
        return self.engine.score_line(line_query, score_shifts, cache)


def test_positions_stay_absolute_after_eviction(pair):
    _, step = pair
    lines = step.family.token_layout(LAYOUT)
    policy = Policy(PolicyConfig(name="linear", budget=lines.width), lines)
    spy = PositionSpy(TorchEngine(step))
    result = generate(spy, PROMPTS, policy, GREEDY_CFG)
    assert result.stats.evictions == LAYOUT.height - 2
    prefix = len(PROMPTS[0])
    assert spy.positions[0] == [prefix - 1] * 4
    for index, rows in enumerate(spy.positions[1:]):
        assert rows == [prefix + index] * 4  # absolute, although the cache holds fewer slots
    assert result.stats.peak_cache_len < prefix + LAYOUT.image_tokens


def test_prompt_longer_than_prefix_capacity_is_a_user_error(pair):
    _, step = pair
    policy = Policy(PolicyConfig(name="full"), LAYOUT)
    with pytest.raises(UserError, match="prefix capacity of 10 tokens"):
        generate(TorchEngine(step), [list(range(1, 13))], policy, GREEDY_CFG)


def test_exported_graph_matches_pytorch_step_by_step(pair, tmp_path):
    _, step = pair
    policy = Policy(PolicyConfig(name="linear", budget=2 * LAYOUT.width), LAYOUT)
    export_family_graphs(step, tmp_path, policy.capacity)
    lockstep = LockstepEngine(TorchEngine(step), OnnxStepEngine(tmp_path, step),
                              TOLERANCES["fp32"],
                              GREEDY_CFG.cfg_scale)
    lockstep.generate(PROMPTS, policy)
    assert lockstep.steps == LAYOUT.image_tokens  # one group: cond and uncond share a length
    assert lockstep.token_mismatches == 0
    failed = {name: stats for name, stats in lockstep.stats.items() if not stats.passed}
    assert not failed, failed


def test_vq_decoder_read_alone_matches_the_library_decode(tmp_path):
    from linear_export.models.families.janus import load_janus_decoder

    hf = tiny_janus(seed=2)
    hf.save_pretrained(tmp_path / "janus")
    decode = load_janus_decoder(tmp_path / "janus")
    codes = torch.randint(0, hf.config.vq_config.num_embeddings, (3, 2, 2))
    with torch.no_grad():  # the library's own path: the whole model's decode_image_tokens
        want = hf.decode_image_tokens(codes.reshape(3, -1)).permute(0, 3, 1, 2).clamp(-1, 1)
    torch.testing.assert_close(decode(codes), want)
    assert decode(torch.zeros(1, 3, 3, dtype=torch.long)).shape[:2] == (1, 3)  # other grids
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No .safetensors weights"):
        load_janus_decoder(tmp_path / "empty")
