"""Model configurations: the LlamaGen GPT family and a tiny one for tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import UserError


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class GPTConfig:
    """A LlamaGen-style decoder-only transformer (class-conditional)."""

    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None  # None: multi-head attention (n_kv_head == n_head)
    vocab_size: int = 16384
    num_classes: int = 1000
    cls_token_num: int = 1  # prefix length P
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to this
    ffn_dim_multiplier: float | None = None
    downsample: int = 16  # pixels per token side (the VQ tokenizer's stride)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.multiple_of)

    @property
    def class_rows(self) -> int:
        """Rows of the class embedding table: every class plus the null class for CFG."""
        return self.num_classes + 1

    @property
    def null_class(self) -> int:
        return self.num_classes


@dataclass(frozen=True)
class SequenceLayout:
    """Where tokens sit: P prefix tokens, then an h x w grid of image tokens in raster order."""

    prefix: int
    height: int
    width: int

    @property
    def image_tokens(self) -> int:
        return self.height * self.width

    @property
    def length(self) -> int:
        return self.prefix + self.image_tokens

    @classmethod
    def for_image(cls, config: GPTConfig, image_size: int) -> SequenceLayout:
        if image_size <= 0 or image_size % config.downsample:
            raise UserError(
                f"--image-size {image_size} is not a positive multiple of the tokenizer's "
                f"downsampling factor {config.downsample}; use e.g. {16 * config.downsample} "
                f"or {24 * config.downsample}."
            )
        grid = image_size // config.downsample
        return cls(prefix=config.cls_token_num, height=grid, width=grid)


GPT_CONFIGS: dict[str, GPTConfig] = {
    "GPT-B": GPTConfig(dim=768, n_layer=12, n_head=12),
    "GPT-L": GPTConfig(dim=1024, n_layer=24, n_head=16),
    "GPT-XL": GPTConfig(dim=1280, n_layer=36, n_head=20),
    "GPT-XXL": GPTConfig(dim=1536, n_layer=48, n_head=24),
    "GPT-3B": GPTConfig(dim=3200, n_layer=24, n_head=32),
    # Small random-weight model for tests: 4 heads of 16, two layers, 10 classes.
    "GPT-tiny": GPTConfig(
        dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, multiple_of=32, downsample=4
    ),
    # Grouped-query variant of the tiny model, to keep n_kv_head < n_head working.
    "GPT-tiny-gqa": GPTConfig(
        dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=64, num_classes=10,
        multiple_of=32, downsample=4,
    ),
    # The bundled demo model (linear_export.demo), trained on procedural 64 px shapes.
    "GPT-demo": GPTConfig(dim=128, n_layer=6, n_head=4, vocab_size=512, num_classes=10,
                          multiple_of=64, downsample=4),
}


def get_config(name: str, **overrides: object) -> GPTConfig:
    """Look up a named config; unknown names are a user error listing the known ones."""
    if name not in GPT_CONFIGS:
        known = ", ".join(GPT_CONFIGS)
        raise UserError(f"Unknown model '{name}'; choose one of: {known}.")
    return replace(GPT_CONFIGS[name], **overrides) if overrides else GPT_CONFIGS[name]
