"""Chameleon's VQGAN decoder (Lumina-mGPT's image tokenizer): codes -> images.

Module and parameter names follow Meta's `vqgan.ckpt` (the taming-transformers VQGAN that
chameleon/inference/vqgan.py and Lumina-mGPT's chameleon_vae_ori/vqgan.py build), so the
release's decoder half loads unchanged: `quantize.embedding.weight` (a plain codebook, no
normalisation), `post_quant_conv`, `decoder.conv_in`, `decoder.mid.{block_1,attn_1,block_2}`,
`decoder.up.{level}.{block,attn}.{j}` with `decoder.up.{level}.upsample.conv` for every level
but 0, `decoder.norm_out`, `decoder.conv_out`. Levels run from the last (lowest resolution)
to 0, each with num_res_blocks + 1 ResnetBlocks. The config is read from the checkpoint's
shapes, so no vqgan.yaml is needed; the release's is ch 128, ch_mult (1, 1, 2, 2, 4),
num_res_blocks 2, z_channels 256, embed_dim 256, 8192 codes, no attention in the levels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .vq import _mismatch_sentence, _read_state_dict
from .vq_network import AttnBlock, ResnetBlock, Upsample, _conv3, _norm

NAME = "chameleon-vqgan"  # the manifest's and load_decoder's name for this decoder
GROUPS = 32  # taming's Normalize: GroupNorm(32, eps 1e-6)
# Keys of the checkpoint the decoder does not use: the encoding half and training losses.
UNUSED_PREFIXES = ("encoder.", "quant_conv.", "loss.")


@dataclass(frozen=True)
class ChameleonVQConfig:
    """The decoder's shape; the defaults are the Chameleon release's vqgan.yaml."""

    n_embed: int = 8192
    embed_dim: int = 256
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # the decoder holds num_res_blocks + 1 blocks per level
    attn_levels: tuple[int, ...] = ()  # levels with an AttnBlock after each ResnetBlock
    out_ch: int = 3

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.ch_mult) - 1)


class UpLevel(nn.Module):
    """One decoder level: `block.{j}`, `attn.{j}` (when the level has attention), `upsample`."""

    def __init__(self, cin: int, cout: int, blocks: int, attention: bool, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, GROUPS)
                                   for j in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, GROUPS) for _ in range(blocks if attention
                                                                         else 0))
        if upsample:
            self.upsample = Upsample(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[index](x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, GROUPS)
        self.attn_1 = AttnBlock(channels, GROUPS)
        self.block_2 = ResnetBlock(channels, channels, GROUPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class ChameleonDecoder(nn.Module):
    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        widths = [cfg.ch * mult for mult in cfg.ch_mult]
        self.conv_in = _conv3(cfg.z_channels, widths[-1])
        self.mid = Middle(widths[-1])
        levels: list[nn.Module] = [nn.Identity()] * len(widths)
        cin = widths[-1]
        for level in reversed(range(len(widths))):  # built lowest resolution first, as run
            levels[level] = UpLevel(cin, widths[level], cfg.num_res_blocks + 1,
                                    level in cfg.attn_levels, upsample=level != 0)
            cin = widths[level]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0], GROUPS)
        self.conv_out = _conv3(widths[0], cfg.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class Codebook(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)


class ChameleonVQDecoder(nn.Module):
    """The decoding half of Chameleon's VQGAN; `decode_codes` as the LlamaGen VQModel's."""

    def __init__(self, config: ChameleonVQConfig):
        super().__init__()
        self.config = config
        self.quantize = Codebook(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = ChameleonDecoder(config)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, 16h, 16w) clamped to [-1, 1]."""
        z = self.quantize.embedding(codes.long()).permute(0, 3, 1, 2)  # channel-first
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)


def config_from_state_dict(sd: dict[str, torch.Tensor], path: Path) -> ChameleonVQConfig:
    """The decoder config a checkpoint's shapes imply (Meta's layout), or one clear error."""
    needed = ("quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_out.weight",
              "decoder.up.0.block.0.conv1.weight")
    absent = [key for key in needed if key not in sd]
    if absent:
        raise UserError(f"'{path}' is not a Chameleon VQGAN checkpoint (no {absent[0]}); pass "
                        "Meta's tokenizer/vqgan.ckpt from the Chameleon release.")
    levels = 1 + max(int(m.group(1)) for key in sd
                     if (m := re.match(r"decoder\.up\.(\d+)\.", key)))
    blocks = 1 + max(int(m.group(1)) for key in sd
                     if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", key)))
    widths = [sd[f"decoder.up.{level}.block.0.conv1.weight"].shape[0]
              if f"decoder.up.{level}.block.0.conv1.weight" in sd else 0
              for level in range(levels)]
    ch = math.gcd(*widths) or 1
    n_embed, embed_dim = sd["quantize.embedding.weight"].shape
    return ChameleonVQConfig(
        n_embed=n_embed, embed_dim=embed_dim, z_channels=sd["post_quant_conv.weight"].shape[0],
        ch=ch, ch_mult=tuple(width // ch for width in widths), num_res_blocks=blocks - 1,
        attn_levels=tuple(level for level in range(levels)
                          if any(key.startswith(f"decoder.up.{level}.attn.") for key in sd)),
        out_ch=sd["decoder.conv_out.weight"].shape[0])


def load_chameleon_vq(path: str | Path, codes: int | None = None) -> ChameleonVQDecoder:
    """Meta's vqgan.ckpt (or a .safetensors of the same keys), decoder half, strictly.

    `codes`: the generator's image-code count, which the codebook must match.
    """
    path = Path(path)
    sd = {key: value for key, value in _read_state_dict(path).items()
          if not key.startswith(UNUSED_PREFIXES)}
    config = config_from_state_dict(sd, path)
    with torch.device("meta"):
        model = ChameleonVQDecoder(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    problem = _mismatch_sentence(path, sd, expected, NAME)
    if problem is not None:
        raise UserError(f"{problem}; pass Meta's tokenizer/vqgan.ckpt, complete.")
    if codes is not None and config.n_embed != codes:
        raise UserError(f"The VQGAN checkpoint '{path}' has {config.n_embed} codes but the model "
                        f"generates {codes}; pass the tokenizer released with this model.")
    if config.downsample != 16:
        raise UserError(f"The VQGAN checkpoint '{path}' upsamples by {config.downsample}, not "
                        "16 as Lumina-mGPT's token grid needs; pass Chameleon's vqgan.ckpt.")
    sd = {key: value.float() for key, value in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
