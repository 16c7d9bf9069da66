"""bench --llamagen-src: LlamaGen's own generate(), imported from a checkout (runtime/original).

The real checkout cannot be fetched in CI, so a stand-in with LlamaGen's module layout and
call signature (written here, not copied) checks the wiring: what is built, what is loaded,
how generate() is called, and the errors.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from linear_export.errors import UserError
from linear_export.runtime.original import OriginalLoop, import_original
from linear_export.runtime.sampling import SamplingConfig

from conftest import tiny_model

FAKE_GPT = """
    from linear_export.models import GPT, SequenceLayout, get_config

    CALLS = []

    def tiny(**kwargs):
        CALLS.append(kwargs)
        side = int(kwargs["block_size"] ** 0.5)
        return GPT(get_config("GPT-tiny"), SequenceLayout(kwargs["cls_token_num"], side, side))

    GPT_models = {"GPT-tiny": tiny}
"""
FAKE_GENERATE = """
    import torch

    CALLS = []

    def generate(model, cond, max_new_tokens, emb_masks=None, cfg_scale=1.0, cfg_interval=-1,
                 **sampling_kwargs):
        CALLS.append((cond.tolist(), max_new_tokens, cfg_scale, sampling_kwargs))
        return torch.zeros(len(cond), max_new_tokens, dtype=torch.int)
"""


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    models = tmp_path / "autoregressive" / "models"
    models.mkdir(parents=True)
    (tmp_path / "autoregressive" / "__init__.py").write_text("")
    (models / "__init__.py").write_text("")
    (models / "gpt.py").write_text(textwrap.dedent(FAKE_GPT))
    (models / "generate.py").write_text(textwrap.dedent(FAKE_GENERATE))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [name for name in sys.modules if name.startswith("autoregressive")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_the_original_is_built_as_sample_c2i_does_and_takes_the_same_weights(checkout) -> None:
    model = tiny_model()
    loop = OriginalLoop(model, checkout, "GPT-tiny")
    gpt = sys.modules["autoregressive.models.gpt"]
    assert gpt.CALLS == [{"vocab_size": 64, "block_size": 16, "num_classes": 10,
                          "cls_token_num": 1, "model_type": "c2i"}]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loop.original.state_dict()[name], tensor), name
    tokens, seconds = loop.generate([3, 4], SamplingConfig(cfg_scale=4.0, top_k=7), seed=1)
    assert tokens.shape == (2, 16) and seconds >= 0
    calls = sys.modules["autoregressive.models.generate"].CALLS
    assert calls == [([3, 4], 16, 4.0, {"temperature": 1.0, "top_k": 7, "top_p": 1.0,
                                        "sample_logits": True})]


def test_a_directory_that_is_no_checkout_is_one_sentence(tmp_path, checkout) -> None:
    with pytest.raises(UserError, match="is not a LlamaGen checkout"):
        import_original(tmp_path / "nowhere")
    with pytest.raises(UserError, match="LlamaGen's code has no GPT-B; its models: GPT-tiny"):
        OriginalLoop(tiny_model(), checkout, "GPT-B")
