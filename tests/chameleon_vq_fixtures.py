"""Chameleon VQGAN weights in Meta's vqgan.ckpt key layout, and a functional decode written
from the architecture (taming-transformers' VQGAN decoder, as chameleon/inference/vqgan.py
builds it), independent of linear_export's modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Small but with every feature: 5 levels (stride 16), a width change (nin_shortcut) between
# levels 2 and 1, attention blocks in the lowest-resolution level, 16 codes of 8 dims.
TINY = {"ch": 32, "ch_mult": (1, 1, 2, 2, 2), "blocks": 2, "attn_levels": (4,), "z": 32,
        "embed_dim": 8, "n_embed": 16}


def meta_vqgan_state(seed: int = 0, ch: int = 32, ch_mult=(1, 1, 2, 2, 2), blocks: int = 2,
                     attn_levels=(4,), z: int = 32, embed_dim: int = 8,
                     n_embed: int = 16) -> dict[str, torch.Tensor]:
    """Random weights under Meta's names; `blocks` ResnetBlocks per decoder level
    (num_res_blocks + 1), plus encoder / quant_conv / loss keys a real checkpoint holds."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, *shape: int, scale: float = 0.1) -> None:
        state[name] = torch.randn(*shape, generator=generator) * scale

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        put(f"{name}.weight", cout, cin, k, k, scale=(cin * k * k) ** -0.5)
        put(f"{name}.bias", cout, scale=0.05)

    def norm(name: str, c: int) -> None:
        state[f"{name}.weight"] = 1 + torch.randn(c, generator=generator) * 0.1
        put(f"{name}.bias", c, scale=0.1)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    put("quantize.embedding.weight", n_embed, embed_dim, scale=1.0)
    conv("post_quant_conv", embed_dim, z, 1)
    conv("quant_conv", z, embed_dim, 1)  # encoder side: ignored by the decoder
    conv("encoder.conv_in", 3, ch, 3)
    put("loss.discriminator.main.0.weight", 4, 3, 4, 4)
    widths = [ch * m for m in ch_mult]
    conv("decoder.conv_in", z, widths[-1], 3)
    resnet("decoder.mid.block_1", widths[-1], widths[-1])
    attn("decoder.mid.attn_1", widths[-1])
    resnet("decoder.mid.block_2", widths[-1], widths[-1])
    cin = widths[-1]
    for level in reversed(range(len(widths))):
        for j in range(blocks):
            resnet(f"decoder.up.{level}.block.{j}", cin, widths[level])
            cin = widths[level]
            if level in attn_levels:
                attn(f"decoder.up.{level}.attn.{j}", cin)
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, 3, 3)
    return state


def reference_decode(state: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, h, w] -> images [B, 3, 16h, 16w] in [-1, 1], by hand from the raw weights."""

    def conv(name: str, x: torch.Tensor) -> torch.Tensor:
        weight = state[f"{name}.weight"]
        return F.conv2d(x, weight, state[f"{name}.bias"], padding=weight.shape[-1] // 2)

    def norm(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 32, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def swish(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    def resnet(name: str, x: torch.Tensor) -> torch.Tensor:
        h = conv(f"{name}.conv1", swish(norm(f"{name}.norm1", x)))
        h = conv(f"{name}.conv2", swish(norm(f"{name}.norm2", h)))
        shortcut = conv(f"{name}.nin_shortcut", x) if f"{name}.nin_shortcut.weight" in state \
            else x
        return shortcut + h

    def attn(name: str, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = norm(f"{name}.norm", x)
        q, k, v = (conv(f"{name}.{p}", h).reshape(b, c, -1) for p in ("q", "k", "v"))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c ** 0.5, dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, height, width)
        return x + conv(f"{name}.proj_out", out)

    z = state["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = conv("decoder.conv_in", conv("post_quant_conv", z))
    h = resnet("decoder.mid.block_2", attn("decoder.mid.attn_1", resnet("decoder.mid.block_1", h)))
    levels = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("decoder.up."))
    for level in reversed(range(levels)):
        j = 0
        while f"decoder.up.{level}.block.{j}.conv1.weight" in state:
            h = resnet(f"decoder.up.{level}.block.{j}", h)
            if f"decoder.up.{level}.attn.{j}.q.weight" in state:
                h = attn(f"decoder.up.{level}.attn.{j}", h)
            j += 1
        if level != 0:
            h = conv(f"decoder.up.{level}.upsample.conv",
                     h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    h = conv("decoder.conv_out", swish(norm("decoder.norm_out", h)))
    return h.clamp(-1, 1)


def save_meta_ckpt(path, state: dict[str, torch.Tensor]) -> None:
    """As a Lightning checkpoint: the weights under "state_dict", beside training counters."""
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, path)
