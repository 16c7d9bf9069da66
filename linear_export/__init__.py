"""linear-export: deploy autoregressive image generators with a small, fixed-capacity KV cache.

The public API is `linear_export.api`, re-exported here: `import linear_export as le`."""

__version__ = "0.1.0"

from .api import *  # noqa: E402, F403
from .api import __all__  # noqa: E402, F401
