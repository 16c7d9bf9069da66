"""LlamaGen t2i: caption-feature prefix through the step contract vs a masked full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linear_export.engines.ort import OrtEngine
from linear_export.engines.torch import TorchEngine
from linear_export.errors import UserError
from linear_export.export.artifact import build_artifact, load_artifact
from linear_export.export.reference import reference_model
from linear_export.models.configs import GPTConfig, SequenceLayout, get_config
from linear_export.models.families import load_step_model
from linear_export.models.families.t2i import T2IGPT, load_caption
from linear_export.models.gpt import init_weights
from linear_export.runtime.generate import generate
from linear_export.runtime.policies import Policy, PolicyConfig, fit_policy
from linear_export.runtime.sampling import SamplingConfig
from linear_export.runtime.verify import compare_engines, format_report

CONFIG = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=0, cls_token_num=8,
                   multiple_of=32, downsample=4)
LAYOUT = SequenceLayout(prefix=8, height=3, width=3)
CAPTION_DIM = 16


@pytest.fixture(scope="module")
def model():
    model = init_weights(T2IGPT(CONFIG, LAYOUT, caption_dim=CAPTION_DIM), seed=3, std=0.1)
    with torch.no_grad():
        model.cls_embedding.uncond_embedding.normal_(generator=torch.Generator().manual_seed(4))
    return model.eval()


def masked_forward(model: T2IGPT, caption: torch.Tensor, valid: int, codes: torch.Tensor):
    """The original's prefill: left-padded caption, pad keys masked for every query but itself."""
    prefix = model.layout.prefix
    padded = torch.zeros(prefix, caption.shape[-1])
    padded[prefix - valid:] = caption[-valid:]
    with torch.no_grad():
        h = torch.cat([model.cls_embedding.cap_proj(padded),
                       model.tok_embeddings(codes.reshape(-1))])[None]
        length = h.shape[1]
        cos_sin = model.rope[torch.arange(length)][None]
        key_ok = torch.arange(length) >= prefix - valid
        mask = torch.ones(length, length, dtype=torch.bool).tril() & key_ok
        mask |= torch.eye(length, dtype=torch.bool)
        for layer in model.layers:
            q, k, v = layer.attention.project(layer.attention_norm(h), cos_sin)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + layer.attention.wo(out.transpose(1, 2).reshape(1, length, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return model.output(model.norm(h))[0].float()


def test_full_policy_reproduces_the_masked_forward(model):
    generator = torch.Generator().manual_seed(5)
    captions = [torch.randn(5, CAPTION_DIM, generator=generator),
                torch.randn(8, CAPTION_DIM, generator=generator)]  # two prefix groups
    teacher = torch.randint(0, CONFIG.vocab_size, (2, 3, 3), generator=generator)
    policy = Policy(PolicyConfig(name="full"), LAYOUT)
    seen: dict[int, torch.Tensor] = {}
    sampling = SamplingConfig(cfg_scale=2.0, temperature=0, top_k=0)
    generate(TorchEngine(model), captions, policy, sampling, teacher_tokens=teacher,
             on_step=lambda index, logits: seen.__setitem__(index, logits.clone()))
    uncond = model.cls_embedding.uncond_embedding
    rows = [(c, c.shape[0]) for c in captions] + [(uncond, c.shape[0]) for c in captions]
    for row, (caption, valid) in enumerate(rows):
        expected = masked_forward(model, caption, valid, teacher[row % 2])
        got = torch.stack([seen[index][row] for index in range(LAYOUT.image_tokens)])
        want = expected[LAYOUT.prefix - 1: LAYOUT.prefix - 1 + LAYOUT.image_tokens]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_caption_longer_than_the_prefix_is_a_user_error(model):
    policy = Policy(PolicyConfig(name="full"), LAYOUT)
    with pytest.raises(UserError, match="prefix capacity of 8 tokens"):
        generate(TorchEngine(model), [torch.zeros(9, CAPTION_DIM)], policy, SamplingConfig())


def test_load_caption_applies_the_mask_and_reports_missing_files(tmp_path):
    from safetensors.torch import save_file

    features = torch.randn(6, 2048)
    save_file({"caption": features, "mask": torch.tensor([0, 0, 1, 1, 1, 1])},
              str(tmp_path / "c.safetensors"))
    torch.testing.assert_close(load_caption(tmp_path / "c.safetensors"), features[2:])
    np.save(tmp_path / "c.npy", features.numpy())
    torch.testing.assert_close(load_caption(tmp_path / "c.npy"), features)
    with pytest.raises(UserError, match="do not exist"):
        load_caption(tmp_path / "missing.npy")
    np.save(tmp_path / "bad.npy", np.zeros((3, 7), dtype=np.float32))
    with pytest.raises(UserError, match="2048-d"):
        load_caption(tmp_path / "bad.npy")


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    """The tiny t2i model as an artifact: step graphs, the features prefill, the uncond rows."""
    policy = Policy(PolicyConfig(name="linear", budget=3), LAYOUT)
    out = tmp_path_factory.mktemp("t2i") / "artifact"
    build_artifact(model, out, model_name="t2i-tiny", image_size=12, capacity=policy.capacity,
                   weights={"source": "random", "seed": 3, "std": 0.1},
                   build_options={"policy": "linear"}, max_batch=4)
    return out


def test_artifact_holds_the_features_prefill_and_the_uncond_embedding(model, artifact):
    loaded = load_artifact(artifact)
    assert loaded.prefill_embeds_path is not None
    inputs = loaded.manifest["io"]["prefill_embeds.onnx"]["inputs"]
    assert inputs[0]["name"] == "inputs_embeds" and inputs[0]["shape"][2] == CAPTION_DIM
    family = loaded.family
    assert family.name == "llamagen-t2i" and family.caption_dim == CAPTION_DIM
    torch.testing.assert_close(family.uncond, model.cls_embedding.uncond_embedding)
    rebuilt = reference_model(loaded)
    assert isinstance(rebuilt, T2IGPT) and rebuilt.caption_dim == CAPTION_DIM


def test_ort_artifact_generates_the_torch_tokens_with_guidance(model, artifact):
    engine = OrtEngine(artifact)
    generator = torch.Generator().manual_seed(8)
    captions = [torch.randn(5, CAPTION_DIM, generator=generator),
                torch.randn(8, CAPTION_DIM, generator=generator)]
    policy = Policy(PolicyConfig(name="linear", budget=3), LAYOUT)  # one line of budget
    sampling = SamplingConfig(cfg_scale=3.0, temperature=0, top_k=0)  # uncond rows included
    want = generate(TorchEngine(model), captions, policy, sampling)
    got = generate(engine, captions, fit_policy(policy, engine.capacity), sampling)
    assert torch.equal(got.tokens, want.tokens)
    assert want.stats.evictions == 1  # after line 1: two lines held, one line of budget
    # Step by step, the features prefill included, every output within fp32 tolerance.
    report = compare_engines(TorchEngine(model), engine, fit_policy(policy, engine.capacity),
                             captions, cfg_scale=3.0, dtype_name="fp32")
    assert report.passed, format_report(report)
    assert report.outputs["logits"].steps == report.steps == LAYOUT.image_tokens * 2


def official_t2i_shapes(dim: int, n_layer: int, vocab: int, hidden: int) -> dict[str, tuple]:
    """The key set and shapes of LlamaGen's t2i checkpoints, written from the release facts
    (shared/reference/llamagen.md; LlamaGen's autoregressive/models/gpt.py): MHA, no biases
    anywhere, the caption MLP over 120 x 2048 flan-t5-xl features bias-free too."""
    shapes = {
        "cls_embedding.cap_proj.fc1.weight": (dim, 2048),
        "cls_embedding.cap_proj.fc2.weight": (dim, dim),
        "cls_embedding.uncond_embedding": (120, 2048),
        "tok_embeddings.weight": (vocab, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    for n in range(n_layer):
        shapes.update({
            f"layers.{n}.attention.wqkv.weight": (3 * dim, dim),
            f"layers.{n}.attention.wo.weight": (dim, dim),
            f"layers.{n}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{n}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{n}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{n}.attention_norm.weight": (dim,),
            f"layers.{n}.ffn_norm.weight": (dim,),
        })
    return shapes


def test_t2i_gpt_b_has_exactly_the_official_key_set_and_shapes():
    config = get_config("GPT-B", cls_token_num=120)
    with torch.device("meta"):
        model = T2IGPT(config, SequenceLayout(prefix=120, height=32, width=32))
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == official_t2i_shapes(768, 12, 16384, 2048)


def save_official_tiny(path, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """GPT-tiny (dim 64, 2 layers, vocab 64; SwiGLU hidden round_up(170, 32) = 192) saved in
    the official layout: the weights under "model" of a torch pickle."""
    generator = torch.Generator().manual_seed(11)
    state = {key: torch.randn(shape, generator=generator) * 0.05
             for key, shape in official_t2i_shapes(64, 2, 64, 192).items()}
    state.update(extra or {})
    torch.save({"model": state}, path)
    return state


def test_checkpoint_with_exactly_the_official_keys_loads(tmp_path):
    state = save_official_tiny(tmp_path / "t2i.pt")
    model = load_step_model("llamagen-t2i", checkpoint=tmp_path / "t2i.pt",
                            model_name="GPT-tiny", image_size=16)
    features = torch.randn(3, 2048, generator=torch.Generator().manual_seed(2))
    fc1 = state["cls_embedding.cap_proj.fc1.weight"]
    fc2 = state["cls_embedding.cap_proj.fc2.weight"]
    want = F.gelu(features @ fc1.T, approximate="tanh") @ fc2.T  # no bias terms
    with torch.no_grad():
        torch.testing.assert_close(model.cls_embedding.cap_proj(features), want)
    torch.testing.assert_close(model.cls_embedding.uncond_embedding,
                               state["cls_embedding.uncond_embedding"])


def test_checkpoint_with_caption_biases_is_one_clear_error(tmp_path):
    save_official_tiny(tmp_path / "biased.pt",
                       {"cls_embedding.cap_proj.fc1.bias": torch.zeros(64),
                        "cls_embedding.cap_proj.fc2.bias": torch.zeros(64)})
    with pytest.raises(UserError) as error:
        load_step_model("llamagen-t2i", checkpoint=tmp_path / "biased.pt",
                        model_name="GPT-tiny", image_size=16)
    message = str(error.value)
    assert "unexpected cls_embedding.cap_proj.fc1.bias, cls_embedding.cap_proj.fc2.bias" in message
    assert "has no biases" in message and "\n" not in message and message.endswith(".")
