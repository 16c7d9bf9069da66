"""Official LlamaGen key layout, every checkpoint format, and clear errors on mismatch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from linear_export.errors import UserError
from linear_export.models import GPT, SequenceLayout, get_config, load_gpt
from linear_export.models.checkpoint import guess_config_name, read_state_dict

from conftest import tiny_model


def test_gpt_b_keys_and_shapes_match_the_official_layout() -> None:
    with torch.device("meta"):
        model = GPT(get_config("GPT-B"), SequenceLayout(1, 16, 16))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = {
        "cls_embedding.embedding_table.weight": (1001, 768),
        "tok_embeddings.weight": (16384, 768),
        "layers.0.attention.wqkv.weight": (2304, 768),
        "layers.0.attention.wo.weight": (768, 768),
        "layers.0.feed_forward.w1.weight": (2048, 768),
        "layers.0.feed_forward.w3.weight": (2048, 768),
        "layers.0.feed_forward.w2.weight": (768, 2048),
        "layers.0.attention_norm.weight": (768,),
        "layers.0.ffn_norm.weight": (768,),
        "norm.weight": (768,),
        "output.weight": (16384, 768),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert len(shapes) == 4 + 7 * 12  # 2 embeddings, norm, output + 7 tensors per layer
    params = sum(value.numel() for value in model.state_dict().values())
    assert 105e6 < params < 115e6  # 111M published


@pytest.mark.parametrize(("name", "ffn"), [("GPT-L", 2816), ("GPT-XL", 3584), ("GPT-3B", 8704)])
def test_ffn_hidden_sizes(name: str, ffn: int) -> None:
    config = get_config(name)
    expected = -(-int(2 * 4 * config.dim / 3) // 256) * 256  # round_up(int(8d/3), 256)
    assert config.ffn_hidden == expected == ffn


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", None])
def test_pt_round_trip(tmp_path, wrapper) -> None:
    source = tiny_model(seed=3)
    payload = source.state_dict() if wrapper is None else {wrapper: source.state_dict(), "x": 1}
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    loaded = load_gpt("GPT-tiny", 16, path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_safetensors_round_trip_and_fp16(tmp_path) -> None:
    source = tiny_model(seed=4)
    path = tmp_path / "ckpt.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = load_gpt("GPT-tiny", 16, path, dtype="fp16")
    assert loaded.output.weight.dtype == torch.float16
    assert torch.equal(loaded.output.weight.float(), source.output.weight.half().float())


def test_training_buffers_are_ignored(tmp_path) -> None:
    source = tiny_model()
    state = dict(source.state_dict())
    state["freqs_cis"] = torch.zeros(3)
    state["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "c.pt")
    load_gpt("GPT-tiny", 16, tmp_path / "c.pt")


def test_mismatch_names_keys_and_suggests_the_model(tmp_path) -> None:
    with torch.device("meta"):
        other = GPT(get_config("GPT-tiny-gqa"), SequenceLayout(1, 4, 4))
    state = {key: torch.zeros(value.shape) for key, value in other.state_dict().items()}
    big = dict(state)
    big["layers.0.attention.wqkv.weight"] = torch.zeros(7, 64)
    torch.save(big, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"mis-shaped layers\.0\.attention\.wqkv\.weight"):
        load_gpt("GPT-tiny", 16, tmp_path / "bad.pt")
    with torch.device("meta"):
        base = GPT(get_config("GPT-B"), SequenceLayout(1, 2, 2))
    torch.save({key: torch.zeros(value.shape) for key, value in base.state_dict().items()},
               tmp_path / "b.pt")
    with pytest.raises(UserError, match="it looks like --model GPT-B"):
        load_gpt("GPT-tiny", 16, tmp_path / "b.pt")


def test_guess_config_from_width_and_depth() -> None:
    with torch.device("meta"):
        model = GPT(get_config("GPT-L"), SequenceLayout(1, 2, 2))
    assert guess_config_name(model.state_dict()) == "GPT-L"


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        read_state_dict(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="cannot be read"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds no state dict"):
        read_state_dict(tmp_path / "list.pt")
