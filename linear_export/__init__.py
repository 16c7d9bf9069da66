"""linear-export: deploy autoregressive image generators with a small, fixed-capacity KV cache.

The public API is `linear_export.api`, re-exported here: `import linear_export as le`. It is
imported on first use, so `import linear_export.runtime...` (the bench's child processes,
Ray workers) loads only what it needs."""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    api = importlib.import_module(".api", __name__)  # lazily, see the docstring
    if name == "__all__" or name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'linear_export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *importlib.import_module(".api", __name__).__all__])
