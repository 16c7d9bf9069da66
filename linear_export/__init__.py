"""linear-export: deploy autoregressive image generators with a small, fixed-capacity KV cache."""

__version__ = "0.1.0"
