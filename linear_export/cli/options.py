"""Options shared by several commands (model, policy, sampling), and their parsing."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..models import DTYPES, GPT_CONFIGS
from ..runtime.budget import BUDGET_HELP
from ..runtime.policies import POLICIES, PolicyConfig


def compose(*decorators: Callable) -> Callable:
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


model_options = compose(
    click.option("--checkpoint", type=click.Path(), default=None,
                 help="LlamaGen GPT checkpoint (.pt or .safetensors), or for --family janus/"
                      "lumina a local Hugging Face model directory; omit with --random-weights."),
    click.option("--model", "model_name", default="GPT-B", show_default=True,
                 help=f"Model config: {', '.join(GPT_CONFIGS)}."),
    click.option("--random-weights", is_flag=True,
                 help="Use seeded random weights instead of a checkpoint (benchmarks, tests)."),
    click.option("--image-size", type=int, default=256, show_default=True,
                 help="Image side in pixels (grid = image size / the tokenizer's stride)."),
    click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
                 help="Model and cache precision."),
    click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda."),
)

sampling_options = compose(
    click.option("--cfg-scale", type=float, default=None,
                 help="Classifier-free guidance scale; 1.0 disables CFG [default: 4.0; 1.0 for "
                      "the bundled demo model, whose samples guidance makes worse]."),
    click.option("--temperature", type=float, default=1.0, show_default=True,
                 help="Sampling temperature; 0 is greedy."),
    click.option("--top-k", type=int, default=2000, show_default=True,
                 help="Top-k; 0 disables."),
    click.option("--top-p", type=float, default=1.0, show_default=True,
                 help="Top-p; 1.0 disables."),
)

RECENT_LINES_HELP = ("linear: newest whole lines always kept [default: 1 up to a 4-line budget, "
                     "half the budget's lines above that].")

HEAD_BUDGETS_HELP = ("linear: per-head budgets from linear-export calibrate; a layer's kv heads "
                     "then keep different numbers of slots (the cache holds the largest count; "
                     "the ort engine needs an artifact built with --head-budgets).")

policy_options = compose(
    click.option("--policy", default="linear", show_default=True,
                 help=f"KV cache policy: {', '.join(POLICIES)}."),
    click.option("--budget", default="1/4", show_default=True,
                 help=f"Cache budget: {BUDGET_HELP}."),
    click.option("--recent-lines", type=int, default=None, help=RECENT_LINES_HELP),
    click.option("--anchor", type=int, default=PolicyConfig.anchor, show_default=True,
                 help="linear: first image tokens always kept."),
    click.option("--granularity", type=click.Choice(["head", "layer"]),
                 default=PolicyConfig.granularity, show_default=True,
                 help="linear/h2o: choose tokens per (layer, head) or per layer."),
    click.option("--cfg-share/--no-cfg-share", default=PolicyConfig.cfg_share, show_default=True,
                 help="Cond and uncond rows share one selection."),
    click.option("--score-queries", type=int, default=PolicyConfig.score_queries,
                 show_default=True,
                 help="linear: score with the finished line's last k queries (0: all)."),
    click.option("--lookahead", type=int, default=None,
                 help="linear: rank slots with those queries rotated 1..N lines ahead, "
                      "summed, i.e. by what later lines will read (0: in place; at most 8) "
                      "[default: 3; 4 with --head-budgets]."),
    click.option("--sinks", type=int, default=PolicyConfig.sinks, show_default=True,
                 help="streaming: first image tokens always kept."),
    click.option("--recent-tokens", type=int, default=None,
                 help="h2o: recent window in tokens [default: half the budget]."),
    click.option("--head-budgets", type=click.Path(dir_okay=False), default=None,
                 help=HEAD_BUDGETS_HELP),
)


def split_list(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())
