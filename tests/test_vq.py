"""VQ tokenizer: official key layout, checkpoint loading, quantiser, ONNX decoder export."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from linear_export.errors import UserError
from linear_export.models.vq import VQ_CONFIGS, VQModel, load_vq

TINY = VQ_CONFIGS["VQ-tiny"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: extra OpenMP threads only add sync cost, seconds per op on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> VQModel:
    torch.manual_seed(0)
    return VQModel(TINY).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vq16_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = VQModel(VQ_CONFIGS["VQ-16"])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _codes(batch: int, h: int = 4, w: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.codebook_size, (batch, h, w), generator=gen)


# ---------------------------------------------------------------- official layout (VQ-16)


def test_vq16_named_shapes(vq16_shapes: dict[str, tuple[int, ...]]) -> None:
    assert VQ_CONFIGS["VQ-16"].downsample == 16
    expected = {
        "decoder.conv_blocks.0.res.0.conv1.weight": (512, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.mid.1.q.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "quant_conv.weight": (8, 256, 1, 1),
        "quantize.embedding.weight": (16384, 8),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
    }
    assert {k: vq16_shapes.get(k) for k in expected} == expected


def test_vq16_level_structure(vq16_shapes: dict[str, tuple[int, ...]]) -> None:
    def blocks(side: str, kind: str) -> dict[int, set[int]]:
        found: dict[int, set[int]] = {}
        for key in vq16_shapes:
            m = re.match(rf"{side}\.conv_blocks\.(\d+)\.{kind}\.(\d+)\.", key)
            if m:
                found.setdefault(int(m[1]), set()).add(int(m[2]))
        return found

    def resampled(side: str, kind: str) -> set[int]:
        return {int(m[1]) for k in vq16_shapes
                if (m := re.match(rf"{side}\.conv_blocks\.(\d+)\.{kind}\.conv\.weight$", k))}

    assert blocks("decoder", "res") == {i: {0, 1, 2} for i in range(5)}
    assert blocks("decoder", "attn") == {0: {0, 1, 2}}
    assert resampled("decoder", "upsample") == {0, 1, 2, 3}
    assert blocks("encoder", "res") == {i: {0, 1} for i in range(5)}
    assert blocks("encoder", "attn") == {4: {0, 1}}
    assert resampled("encoder", "downsample") == {0, 1, 2, 3}
    mids = {k.split(".")[2] for k in vq16_shapes if k.startswith("decoder.mid.")}
    assert mids == {"0", "1", "2"}
    # Widths of the decoder levels, from the first res block's conv2 (out, out, 3, 3).
    widths = [vq16_shapes[f"decoder.conv_blocks.{i}.res.0.conv2.weight"][0] for i in range(5)]
    assert widths == [512, 256, 256, 128, 128]
    tops = {k.split(".")[0] for k in vq16_shapes}
    assert tops == {"encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"}


def test_vq16_decoder_param_count(vq16_shapes: dict[str, tuple[int, ...]]) -> None:
    # Count from the architecture facts alone: conv = weights + bias, GroupNorm = 2 * c.
    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + cout

    def res(cin: int, cout: int) -> int:
        short = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout, 3) + 2 * cout + conv(cout, cout, 3) + short

    def attn(c: int) -> int:
        return 2 * c + 4 * conv(c, c, 1)

    total = 16384 * 8 + conv(8, 256, 1) + conv(256, 512, 3)
    total += res(512, 512) + attn(512) + res(512, 512)
    cin = 512
    for i, cout in enumerate([512, 256, 256, 128, 128]):
        for j in range(3):
            total += res(cin if j == 0 else cout, cout) + (attn(cout) if i == 0 else 0)
        total += conv(cout, cout, 3) if i < 4 else 0
        cin = cout
    total += 2 * 128 + conv(128, 3, 3)
    assert 40e6 < total < 46e6  # "~43M params"
    decoder_side = sum(
        int(np.prod(s)) for k, s in vq16_shapes.items()
        if not k.startswith(("encoder.", "quant_conv."))
    )
    assert decoder_side == total


def test_decoder_only_has_no_encoder_keys() -> None:
    with torch.device("meta"):
        keys = VQModel(VQ_CONFIGS["VQ-16"], encoder=False).state_dict().keys()
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in keys)
    assert "decoder.conv_out.weight" in keys


# ---------------------------------------------------------------- building blocks


def test_downsample_pads_right_and_bottom_only(tiny: VQModel) -> None:
    down = tiny.encoder.conv_blocks[0].downsample
    c = down.conv.in_channels
    x = torch.randn(1, c, 8, 8)
    with torch.no_grad():
        w = torch.zeros_like(down.conv.weight)
        w[torch.arange(c), torch.arange(c), 0, 0] = 1.0  # top-left tap, per channel
        y = F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2)
        saved = down.conv.weight.clone(), down.conv.bias.clone()
        down.conv.weight.copy_(w)
        down.conv.bias.zero_()
        out = down(x)
        down.conv.weight.copy_(saved[0])
        down.conv.bias.copy_(saved[1])
    # With no padding on the top/left, the top-left tap reads x[::2, ::2] exactly.
    assert out.shape == (1, c, 4, 4)
    assert torch.equal(out, x[:, :, ::2, ::2]) and torch.equal(out, y)


def test_upsample_is_nearest_then_conv(tiny: VQModel) -> None:
    up = tiny.decoder.conv_blocks[0].upsample
    x = torch.randn(2, up.conv.in_channels, 3, 5)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected = F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(up(x), expected)


# ---------------------------------------------------------------- quantiser


def test_quantizer_matches_brute_force_cosine(tiny: VQModel) -> None:
    q = tiny.quantize
    gen = torch.Generator().manual_seed(2)
    saved = q.embedding.weight.clone()
    # Rows of very different lengths: a plain dot product would prefer the long ones.
    scaled = saved * torch.logspace(-2, 2, saved.shape[0]).unsqueeze(1)
    z = torch.randn(3, TINY.codebook_embed_dim, 5, 6, generator=gen) * 7.0
    try:
        q.embedding.weight.copy_(scaled)
        codes = q.nearest(z)
    finally:
        q.embedding.weight.copy_(saved)
    vectors = z.permute(0, 2, 3, 1).reshape(-1, TINY.codebook_embed_dim).double()
    brute = torch.tensor([
        max(range(scaled.shape[0]),
            key=lambda n, v=v: F.cosine_similarity(v, scaled[n].double(), dim=0).item())
        for v in vectors
    ])
    assert codes.shape == (3, 5, 6) and codes.dtype == torch.int64
    assert torch.equal(codes.reshape(-1), brute)
    assert not torch.equal(brute, (vectors @ scaled.double().T).argmax(1))  # the test bites


def test_quantizer_is_idempotent_and_scale_invariant(tiny: VQModel) -> None:
    q = tiny.quantize
    codes = _codes(2, 5, 7)
    vectors = q.lookup(codes)
    assert vectors.shape == (2, TINY.codebook_embed_dim, 5, 7)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2, 5, 7))
    assert torch.equal(q.nearest(vectors), codes)
    assert torch.equal(q.nearest(vectors * 0.01), codes)


def test_encode_decode_round_trip(tiny: VQModel) -> None:
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    codes = tiny.encode_images(images)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < TINY.codebook_size
    decoded = tiny.decode_codes(codes)
    assert decoded.shape == (2, 3, 16, 16) and decoded.dtype == torch.float32
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0
    recoded = tiny.encode_images(decoded)
    assert recoded.shape == codes.shape and recoded.max() < TINY.codebook_size


def test_forward_agrees_with_encode_and_decode(tiny: VQModel) -> None:
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    model = VQModel(TINY)
    model.load_state_dict(tiny.state_dict())
    out = model(images)
    assert torch.equal(out.codes, model.encode_images(images))
    with torch.no_grad():
        torch.testing.assert_close(out.reconstruction.clamp(-1, 1), model.decode_codes(out.codes))
    codebook, commitment, total = out.losses
    torch.testing.assert_close(total, codebook + TINY.beta * commitment)
    # Straight-through: the reconstruction loss reaches the encoder; the codebook learns
    # only through the codebook term.
    (out.reconstruction.square().mean() + total).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", None])
def test_pt_round_trip(tiny: VQModel, tmp_path: Path, wrapper: str | None) -> None:
    sd = dict(tiny.state_dict())
    sd["quantize.codebook_used"] = torch.zeros(65536)  # official files carry this; ignored
    obj = sd if wrapper is None else {wrapper: sd, "steps": 7, "args": argparse.Namespace(a=1)}
    path = tmp_path / "vq.pt"
    torch.save(obj, path)
    loaded = load_vq(path, "VQ-tiny")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    codes = _codes(2)
    assert torch.equal(loaded.decode_codes(codes), tiny.decode_codes(codes))
    images = tiny.decode_codes(codes)
    assert torch.equal(loaded.encode_images(images), tiny.encode_images(images))


def test_safetensors_round_trip_and_decoder_only(tiny: VQModel, tmp_path: Path) -> None:
    path = tmp_path / "vq.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    codes = _codes(3)
    for encoder in (True, False):
        loaded = load_vq(path, TINY, encoder=encoder)
        assert torch.equal(loaded.decode_codes(codes), tiny.decode_codes(codes))
    assert loaded.decoder_only and not hasattr(loaded, "encoder")
    with pytest.raises(UserError, match="without its encoder"):
        loaded.encode_images(torch.zeros(1, 3, 16, 16))


def _load_error(path: Path, config: str = "VQ-tiny") -> str:
    with pytest.raises(UserError) as info:
        load_vq(path, config)
    message = str(info.value)
    assert "\n" not in message
    print(message)
    return message


def test_gpt_checkpoint_gets_hint(tmp_path: Path) -> None:
    path = tmp_path / "c2i_B_256.pt"
    torch.save({"model": {
        "tok_embeddings.weight": torch.zeros(16, 4),
        "layers.0.attention.wqkv.weight": torch.zeros(12, 4),
        "norm.weight": torch.zeros(4),
    }}, path)
    assert "looks like a GPT checkpoint" in _load_error(path)
    assert "--checkpoint" in _load_error(path)


def test_wrong_shape_and_missing_keys_are_named(tiny: VQModel, tmp_path: Path) -> None:
    sd = dict(tiny.state_dict())
    sd["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    del sd["decoder.norm_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    message = _load_error(path)
    assert "decoder.conv_out.weight (3, 16, 3, 3)" in message
    assert "1 missing key (decoder.norm_out.bias)" in message
    assert "1 unexpected key (decoder.extra.weight)" in message


def test_wrong_model_name_suggests_the_right_one(tiny: VQModel, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save({"model": tiny.state_dict()}, path)
    message = _load_error(path, "VQ-16")
    assert "matches VQ-tiny" in message


def test_missing_corrupt_and_unknown(tmp_path: Path) -> None:
    assert "does not exist" in _load_error(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert "cannot read" in _load_error(corrupt)
    bad_st = tmp_path / "corrupt.safetensors"
    bad_st.write_bytes(b"\x01\x02")
    assert "cannot read" in _load_error(bad_st)
    with pytest.raises(UserError, match="unknown VQ model"):
        load_vq(corrupt, "VQ-99")


# ---------------------------------------------------------------- ONNX export


def test_onnx_decoder_matches_torch(tiny: VQModel, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from linear_export.export.vq_onnx import export_vq_decoder

    path = tmp_path / "vq_decoder.onnx"
    export_vq_decoder(tiny, path, grid=(4, 5))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("codes", "tensor(int64)", [4, 5])
    assert isinstance(inp.shape[0], str)  # batch stayed dynamic
    assert (out.name, out.type, out.shape[1:]) == ("images", "tensor(float)", [3, 16, 20])
    worst = 0.0
    for batch in (1, 3):
        codes = _codes(batch, 4, 5, seed=batch)
        expected = tiny.decode_codes(codes).numpy()
        (got,) = session.run(None, {"codes": codes.numpy()})
        assert got.shape == (batch, 3, 16, 20) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"VQ-tiny ONNX decoder max abs error vs PyTorch: {worst:.3e}")
    assert worst < 1e-4
