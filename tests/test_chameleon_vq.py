"""Chameleon's VQGAN decoder (Lumina-mGPT images): Meta's key layout, ONNX, `generate --out`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chameleon_vq_fixtures import TINY, meta_vqgan_state, reference_decode, save_meta_ckpt
from click.testing import CliRunner
from PIL import Image

from linear_export.errors import UserError
from linear_export.models.chameleon_vq import ChameleonVQConfig, load_chameleon_vq
from linear_export.runtime.decode import to_uint8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vqgan") / "vqgan.ckpt"
    state = meta_vqgan_state(seed=1)
    save_meta_ckpt(path, state)
    return path, state


def test_config_is_read_from_the_checkpoint_shapes(checkpoint):
    path, _ = checkpoint
    config = load_chameleon_vq(path, codes=16).config
    assert config == ChameleonVQConfig(
        n_embed=TINY["n_embed"], embed_dim=TINY["embed_dim"], z_channels=TINY["z"],
        ch=TINY["ch"], ch_mult=TINY["ch_mult"], num_res_blocks=TINY["blocks"] - 1,
        attn_levels=TINY["attn_levels"])
    assert config.downsample == 16


def test_decoder_matches_the_hand_written_reference(checkpoint):
    path, state = checkpoint
    decoder = load_chameleon_vq(path, codes=16)
    codes = torch.randint(0, 16, (2, 2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = decoder.decode_codes(codes)
    want = reference_decode(state, codes)
    assert got.shape == (2, 3, 32, 48)
    assert 0.05 < float(want.std()) and float((want.abs() < 1).float().mean()) > 0.5  # not flat
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_release_defaults_are_the_vqgan_yaml():
    config = ChameleonVQConfig()
    assert (config.n_embed, config.embed_dim, config.z_channels, config.ch, config.ch_mult,
            config.num_res_blocks, config.attn_levels) == (8192, 256, 256, 128, (1, 1, 2, 2, 4),
                                                           2, ())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("decoder.mid.attn_1.q.weight"), "missing key"),
    (lambda s: s.pop("quantize.embedding.weight"), "not a Chameleon VQGAN checkpoint"),
    (lambda s: s.__setitem__("decoder.conv_in.bias", torch.zeros(7)), "mis-shaped"),
])
def test_a_checkpoint_off_the_layout_is_one_clear_error(tmp_path, change, message):
    state = meta_vqgan_state()
    change(state)
    save_meta_ckpt(tmp_path / "bad.ckpt", state)
    with pytest.raises(UserError, match=message) as error:
        load_chameleon_vq(tmp_path / "bad.ckpt", codes=16)
    assert "\n" not in str(error.value)


def test_codebook_of_another_size_is_a_user_error(checkpoint):
    with pytest.raises(UserError, match="has 16 codes but the model generates 8192"):
        load_chameleon_vq(checkpoint[0], codes=8192)


def test_onnx_decoder_matches_pytorch(checkpoint, tmp_path):
    from linear_export.engines.ort_vq import OrtVQDecoder
    from linear_export.export.vq_onnx import export_vq_decoder

    decoder = load_chameleon_vq(checkpoint[0])
    export_vq_decoder(decoder, tmp_path / "vq.onnx", grid=(2, 2))
    codes = torch.randint(0, 16, (3, 2, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = decoder.decode_codes(codes)
    torch.testing.assert_close(OrtVQDecoder(tmp_path / "vq.onnx").decode_codes(codes), want,
                               atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def lumina_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from family_fixtures import save_word_tokenizer, tiny_chameleon

    directory = tmp_path_factory.mktemp("lumina")
    tiny_chameleon(vocab_size=8900).save_pretrained(directory)  # 16 image codes
    save_word_tokenizer(directory)
    return directory


def test_generate_lumina_out_writes_the_decoded_images(lumina_dir, checkpoint, tmp_path):
    from linear_export.cli import main

    path, state = checkpoint
    out = tmp_path / "samples"
    result = CliRunner().invoke(main, [
        "generate", "--family", "lumina", "--checkpoint", str(lumina_dir), "--image-size", "64",
        "--max-prompt-tokens", "24", "--prompt", "w3 w7", "--prompt", "w5", "--budget", "2lines",
        "--vq-checkpoint", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "images and token grids" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "0000_seed0.png", "0001_seed0.png", "grid.png", "stats.json", "tokens.npy"]
    tokens = torch.from_numpy(np.load(out / "tokens.npy"))
    assert tokens.shape == (2, 4, 4)
    want = to_uint8(reference_decode(state, tokens.long()))
    got = np.asarray(Image.open(out / "0001_seed0.png")).astype(int)
    # Within one 8-bit level (float sums in another order may round a pixel the other way).
    assert np.abs(got - want[1]).max() <= 1 and (got == want[1]).mean() > 0.99
    assert Image.open(out / "grid.png").size == (64 * 2 + 2, 64)
