"""LlamaGen-compatible VQ image tokenizer, the network: config, blocks, encoder, l2-normalised
codebook and decoder (checkpoint loading is in `vq.py`).

Module and parameter names mirror the official release so that `vq_ds16_c2i.pt` loads
unchanged; the architecture follows the facts in reference/llamagen.md ("VQ-16 decoder").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from linear_export.errors import UserError


@dataclass(frozen=True)
class VQConfig:
    """Shape of a VQ tokenizer: codebook, channel widths and depth."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1 per level
    norm_groups: int = 32
    dropout: float = 0.0
    beta: float = 0.25  # commitment-loss weight

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return 2 ** (len(self.ch_mult) - 1)


VQ_CONFIGS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(),
    # Small enough for unit tests; every width is a multiple of 32 so GroupNorm(32) fits.
    "VQ-tiny": VQConfig(
        codebook_size=64, codebook_embed_dim=8, z_channels=32, ch=32, ch_mult=(1, 2, 2),
        num_res_blocks=1,
    ),
    # The bundled demo tokenizer (linear_export.demo): 64 px -> 16x16 codes, 512 entries.
    "VQ-demo": VQConfig(
        codebook_size=512, codebook_embed_dim=8, z_channels=64, ch=16, ch_mult=(1, 2, 4),
        num_res_blocks=1, norm_groups=8,
    ),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm as in the reference (eps 1e-6, affine)."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    """3x3 convolution that keeps the spatial size."""
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3 -> GN -> swish -> conv3, plus a 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(cout, cout)
        # Identity has no parameters, so the state dict only gains `nin_shortcut` when needed.
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape
        q = self.q(h).reshape(b, c, height * width).transpose(1, 2)  # (b, hw, c)
        k = self.k(h).reshape(b, c, height * width)  # (b, c, hw)
        v = self.v(h).reshape(b, c, height * width)  # (b, c, hw)
        attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, query, key)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; padding only right/bottom, as the reference does."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `res.{j}`, optional `attn.{j}` after each, then a resample."""

    def __init__(
        self, cin: int, cout: int, n_res: int, with_attn: bool, cfg: VQConfig, resample: str
    ) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.res = nn.ModuleList(
            ResnetBlock(cin if j == 0 else cout, cout, g, cfg.dropout) for j in range(n_res)
        )
        self.attn = nn.ModuleList(AttnBlock(cout, g) for _ in range(n_res if with_attn else 0))
        # The attribute name is part of the checkpoint key, hence two names for one slot.
        self.resample = resample
        if resample == "downsample":
            self.downsample = Downsample(cout)
        elif resample == "upsample":
            self.upsample = Upsample(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, res in enumerate(self.res):
            x = res(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        if self.resample == "downsample":
            x = self.downsample(x)
        elif self.resample == "upsample":
            x = self.upsample(x)
        return x


def _mid(channels: int, cfg: VQConfig) -> nn.ModuleList:
    """[ResnetBlock, AttnBlock, ResnetBlock] at the lowest resolution."""
    g = cfg.norm_groups
    return nn.ModuleList([
        ResnetBlock(channels, channels, g, cfg.dropout),
        AttnBlock(channels, g),
        ResnetBlock(channels, channels, g, cfg.dropout),
    ])


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, z_channels, H/ds, W/ds)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = _conv3(3, cfg.ch)
        self.conv_blocks = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            last = i == n - 1
            cout = cfg.ch * mult
            self.conv_blocks.append(Level(
                cin, cout, cfg.num_res_blocks, with_attn=last, cfg=cfg,
                resample="" if last else "downsample",
            ))
            cin = cout
        self.mid = _mid(cin, cfg)
        self.norm_out = _norm(cin, cfg.norm_groups)
        self.conv_out = _conv3(cin, cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*ds, w*ds), unclamped."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv3(cfg.z_channels, cin)
        self.mid = _mid(cin, cfg)
        self.conv_blocks = nn.ModuleList()
        # Mirror of the encoder: widest level first, attention only there.
        for i, mult in enumerate(reversed(cfg.ch_mult)):
            cout = cfg.ch * mult
            self.conv_blocks.append(Level(
                cin, cout, cfg.num_res_blocks + 1, with_attn=i == 0, cfg=cfg,
                resample="" if i == n - 1 else "upsample",
            ))
            cin = cout
        self.norm_out = _norm(cin, cfg.norm_groups)
        self.conv_out = _conv3(cin, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQLosses(NamedTuple):
    """Quantisation loss terms; `total` = codebook + beta * commitment."""

    codebook: torch.Tensor
    commitment: torch.Tensor
    total: torch.Tensor


class VQOutput(NamedTuple):
    """What `VQModel.forward` returns."""

    reconstruction: torch.Tensor  # (B, 3, H, W), not clamped so training sees true errors
    codes: torch.Tensor  # (B, h, w) int64
    losses: VQLosses


class VectorQuantizer(nn.Module):
    """Cosine-nearest lookup in an l2-normalised codebook."""

    def __init__(self, codebook_size: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        """The codebook as used: every entry scaled to unit length."""
        return F.normalize(self.embedding.weight, p=2, dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> vectors (B, embed_dim, h, w)."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, embed_dim, h, w) -> codes (B, h, w) of the most cosine-similar entries."""
        z = F.normalize(z, p=2, dim=1)
        # Between unit vectors the largest dot product is the smallest L2 distance.
        return torch.einsum("bchw,nc->bhwn", z, self.codebook()).argmax(dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, VQLosses]:
        """Quantise with a straight-through gradient; returns (z_q, codes, losses)."""
        z = F.normalize(z, p=2, dim=1)
        codes = self.nearest(z)
        z_q = self.lookup(codes)
        codebook_loss = F.mse_loss(z_q, z.detach())  # pulls entries towards the encoder
        commitment = F.mse_loss(z, z_q.detach())  # keeps the encoder near its entries
        losses = VQLosses(codebook_loss, commitment, codebook_loss + self.beta * commitment)
        return z + (z_q - z).detach(), codes, losses


class VQModel(nn.Module):
    """VQ tokenizer; with `encoder=False` only the decoding half is built."""

    def __init__(self, config: VQConfig, *, encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.decoder_only = not encoder
        if encoder:
            self.encoder = Encoder(config)
            self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.quantize = VectorQuantizer(
            config.codebook_size, config.codebook_embed_dim, config.beta
        )
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def _latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> pre-quantisation latent (B, embed_dim, h, w)."""
        if self.decoder_only:
            raise UserError("this VQ model was loaded without its encoder; "
                            "load it with encoder=True to encode images")
        return self.quant_conv(self.encoder(images))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/ds, W/ds) int64."""
        return self.quantize.nearest(self._latent(images))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h*ds, w*ds) clamped to [-1, 1]."""
        z = self.post_quant_conv(self.quantize.lookup(codes))
        return self.decoder(z).clamp(-1.0, 1.0)

    def forward(self, images: torch.Tensor) -> VQOutput:
        """Encode, quantise (straight-through) and decode, for training."""
        z_q, codes, losses = self.quantize(self._latent(images))
        return VQOutput(self.decoder(self.post_quant_conv(z_q)), codes, losses)
