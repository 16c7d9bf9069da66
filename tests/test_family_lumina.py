"""Lumina-mGPT (Chameleon classes): the step contract against the library's own forward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from family_fixtures import OnnxStepEngine, export_family_graphs, tiny_chameleon  # noqa: E402

from linear_export.engines.torch import TorchEngine  # noqa: E402
from linear_export.errors import UserError  # noqa: E402
from linear_export.models.configs import SequenceLayout  # noqa: E402
from linear_export.models.families.lumina import (  # noqa: E402
    LuminaFamily,
    LuminaStep,
    prompt_ids,
)
from linear_export.runtime.generate import generate  # noqa: E402
from linear_export.runtime.policies import Policy, PolicyConfig  # noqa: E402
from linear_export.runtime.sampling import SamplingConfig  # noqa: E402
from linear_export.runtime.verify import TOLERANCES, LockstepEngine  # noqa: E402

LAYOUT = SequenceLayout(prefix=12, height=4, width=2)  # 2 x 1 grids of 32 px
PROMPTS = [[1, 20, 21, 22], [1, 30]]  # different lengths: two cond prefix groups
GREEDY_CFG = SamplingConfig(cfg_scale=2.0, temperature=0, top_k=0)


@pytest.fixture(scope="module")
def pair():
    hf = tiny_chameleon()
    return hf, LuminaStep(hf, LAYOUT, eol_id=5, image_start_id=4, size_base_id=6,
                          separator_id=3)


def full_sequence(step: LuminaStep, context: list[int], codes: torch.Tensor) -> list[int]:
    """The whole token sequence: context, then each line's codes (as BPE ids) and its EOL."""
    tokens = list(context)
    for line in codes.tolist():
        tokens += [int(step.code_ids[c]) for c in line] + [step.family.eol_id]
    return tokens


def library_logits(hf, tokens: list[int], code_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf.model(input_ids=torch.tensor([tokens])).last_hidden_state
        return hf.lm_head(hidden)[0][:, code_ids].float()


def test_full_policy_reproduces_the_library_forward(pair):
    hf, step = pair
    family = step.family
    teacher = torch.randint(0, step.config.vocab_size, (2, LAYOUT.height, LAYOUT.width),
                            generator=torch.Generator().manual_seed(1))
    policy = Policy(PolicyConfig(name="full"), family.token_layout(LAYOUT))
    seen: dict[int, torch.Tensor] = {}
    generate(TorchEngine(step), PROMPTS, policy, GREEDY_CFG, teacher_tokens=teacher,
             on_step=lambda index, logits: seen.__setitem__(index, logits.clone()))
    line = family.line_width(LAYOUT.width)
    assert len(seen) == LAYOUT.height * line
    contexts = [p + [3, 4, 6 + 2, 6 + 1] for p in PROMPTS] + [[4, 6 + 2, 6 + 1]] * 2
    for row, context in enumerate(contexts):
        expected = library_logits(hf, full_sequence(step, context, teacher[row % 2]),
                                  step.code_ids)
        got = torch.stack([seen[index][row] for index in range(len(seen))])
        # Step `index` predicts sequence token len(context) + index.
        want = expected[len(context) - 1: len(context) - 1 + len(seen)]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_linear_lines_are_w_plus_one_tokens(pair):
    _, step = pair
    family = step.family
    lines = family.token_layout(LAYOUT)
    assert lines.width == LAYOUT.width + 1
    budget = 2 * lines.width
    policy = Policy(PolicyConfig(name="linear", budget=budget, recent_lines=1), lines)
    prefix = len(PROMPTS[0]) + 4  # separator, image start, two size tokens
    events = []

    def check(finished: int, cache) -> None:
        events.append((finished, cache.cache_len))
        live = cache.positions[..., : cache.cache_len].reshape(-1, cache.cache_len)
        # The finished line (its end-of-line slot included) and the prefix are kept whole.
        line = range(prefix + finished * lines.width, prefix + (finished + 1) * lines.width)
        for slots in live.tolist():
            assert set(range(prefix)) | set(line) <= set(slots)
            assert len(slots) - prefix == min(budget, (finished + 1) * lines.width)

    result = generate(TorchEngine(step), PROMPTS[:1], policy,
                      SamplingConfig(cfg_scale=1.0, temperature=0, top_k=0), on_line_end=check)
    # One line end per w + 1 tokens; the cache is cut to the budget from line 2 on.
    assert [finished for finished, _ in events] == list(range(LAYOUT.height - 1))
    assert [length for _, length in events] == [
        prefix + min(budget, (f + 1) * lines.width) for f in range(LAYOUT.height - 1)]
    assert result.stats.evictions == LAYOUT.height - 3
    assert result.stats.peak_cache_len == prefix + budget + lines.width
    assert result.tokens.shape == (1, LAYOUT.height, LAYOUT.width)


def test_policy_on_image_width_is_rejected(pair):
    _, step = pair
    wrong = Policy(PolicyConfig(name="full"), LAYOUT)  # lines of w, not w + 1
    with pytest.raises(ValueError, match="lines"):
        generate(TorchEngine(step), PROMPTS[:1], wrong, GREEDY_CFG)


def test_prompt_longer_than_prefix_capacity_is_a_user_error(pair):
    _, step = pair
    policy = Policy(PolicyConfig(name="full"), step.family.token_layout(LAYOUT))
    with pytest.raises(UserError, match="prefix capacity of 12 tokens"):
        generate(TorchEngine(step), [list(range(1, 11))], policy, GREEDY_CFG)


def test_exported_graph_matches_pytorch_step_by_step(pair, tmp_path):
    _, step = pair
    lines = step.family.token_layout(LAYOUT)
    policy = Policy(PolicyConfig(name="linear", budget=2 * lines.width), lines)
    export_family_graphs(step, tmp_path, policy.capacity)
    lockstep = LockstepEngine(TorchEngine(step), OnnxStepEngine(tmp_path, step),
                              TOLERANCES["fp32"],
                              GREEDY_CFG.cfg_scale)
    lockstep.generate(PROMPTS, policy)
    # Three prefix groups (prompts of 8 and 6 tokens, the 3-token uncond context), each a step;
    # guided picks are compared on all rows put back in [cond; uncond] order.
    assert lockstep.steps == 3 * lines.image_tokens
    assert lockstep.token_mismatches == 0
    failed = {name: stats for name, stats in lockstep.stats.items() if not stats.passed}
    assert not failed, failed


# Golden prefixes, by hand from Lumina-mGPT's lumina_mgpt/data/item_processor.py (image start
# `<racm3:break>` 8197; size token `<reserved{8800 + n:05d}>` = id 8804 + n for n 32-px grids,
# read back as `h_grids = token - 8804`, `h_latent_dim = 2 * h_grids`) and
# data/convertsation.py (every turn ends with `<reserved08706>`, id 8710). The uncond context
# is the sequence from the image-start token on (inference_solver.py's CFG processor).
@pytest.mark.parametrize("pixels, cond, uncond", [
    (512, [0, 101, 102, 8710, 8197, 8820, 8820], [8197, 8820, 8820]),  # 16 grids: 32 rows
    (768, [0, 101, 102, 8710, 8197, 8828, 8828], [8197, 8828, 8828]),  # 24 grids: 48 rows
])
def test_prefix_ids_are_the_official_ones(pixels, cond, uncond):
    rows = pixels // 16
    family = LuminaFamily(name="lumina", prefix_capacity=16, image_offset=65536, line_extra=1,
                          eol_id=8803, height=rows, width=rows)
    groups = family.prefix_groups([[0, 101, 102]], cfg=True, device=torch.device("cpu"))
    assert [(g.rows, g.input_ids.tolist(), g.position_ids.tolist(), g.image_position)
            for g in groups] == [([0], [cond], [list(range(7))], 7),
                                 ([1], [uncond], [[0, 1, 2]], 3)]
    assert family.prompt_capacity() == 16 - 4


def test_size_tokens_are_height_then_width():
    family = LuminaFamily(name="lumina", prefix_capacity=16, height=32, width=48)  # 512 x 768
    assert family.image_context() == [8197, 8820, 8828]


class RecordingTokenizer:
    """Stands in for Chameleon's tokenizer: records the text, returns one id per word."""

    bos_token_id, eos_token_id = 0, 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.text, self.special = text, add_special_tokens
        return [100 + index for index, _ in enumerate(text.split(" "))]


def test_prompt_is_bos_and_the_official_instruction():
    tokenizer = RecordingTokenizer()
    ids = prompt_ids(tokenizer, "a lighthouse at dusk", 768)
    # lumina_mgpt/generate_examples/generate.py's instruction; the solver encodes the human
    # turn without special tokens and puts BOS first (xllmx/data/item_processor.py).
    assert tokenizer.text == ("Generate an image of 768x768 according to the following "
                              "prompt:\na lighthouse at dusk")
    assert tokenizer.special is False
    assert ids == [0] + [100 + i for i in range(13)]  # 13 space-separated pieces


def test_an_image_size_of_odd_grids_is_a_user_error(pair):
    hf, _ = pair
    with pytest.raises(UserError, match="multiple of 32"):
        LuminaStep(hf, SequenceLayout(prefix=12, height=5, width=4), eol_id=5,
                   image_start_id=4, size_base_id=6, separator_id=3)
