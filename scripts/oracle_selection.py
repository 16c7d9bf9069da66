"""How good can any LineAR-style selection be on the demo model? An oracle bound.

The oracle keeps, at each line end, the slots the full cache's attention of *all later
lines* uses most (per layer and kv head, the budget's usual recent line always kept). It
reads the future, so it is no policy; it only bounds what scoring can reach at a budget.
It prints the held-out ΔNLL of the oracle beside LineAR's and window's, as `eval` measures it.
`--later-lines 1` makes it read the next line only.

    python scripts/oracle_selection.py --budgets 1/2,1/4,1/8 --heldout 100
"""

from __future__ import annotations

import math

import click
import torch

from linear_export.cli.eval import demo_subject
from linear_export.evaluation.sweep import EvalSettings, teacher_forced_nll
from linear_export.models.gpt import GPT
from linear_export.runtime.budget import parse_budget
from linear_export.runtime.policies import Policy, PolicyConfig


@torch.inference_mode()
def future_attention(model: GPT, tokens: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """[L, B, Hkv, lines, keys]: attention each image line's queries pay each key (full cache)."""
    config, layout = model.config, model.layout
    images = tokens.reshape(len(labels), -1)
    ids = torch.cat([torch.tensor(labels)[:, None] + config.vocab_size, images], 1)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    cos_sin = model.rope[positions]
    hidden, per_layer = model.embed(ids), []
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    for layer in model.layers:
        x = layer.attention_norm(hidden)
        q, k, _ = layer.attention.project(x, cos_sin)
        k = k.repeat_interleave(config.n_head // config.kv_heads, dim=1)
        probs = ((q @ k.transpose(-1, -2)) / math.sqrt(config.head_dim)).masked_fill(
            ~causal, -math.inf).softmax(-1)
        image = probs[:, :, layout.prefix:layout.prefix + layout.image_tokens]
        by_line = image.reshape(*image.shape[:2], layout.height, layout.width, -1).sum(3)
        group = config.n_head // config.kv_heads
        per_layer.append(by_line.view(by_line.shape[0], config.kv_heads, group,
                                      *by_line.shape[2:]).sum(2))
        hidden = hidden + layer.attention.full(x, cos_sin)
        hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
    return torch.stack(per_layer)


class OraclePolicy(Policy):
    """LineAR's selection with priorities from the future's attention instead of scores."""

    def __init__(self, config: PolicyConfig, layout, future: torch.Tensor, later_lines: int):
        super().__init__(config, layout)
        self.future, self.later_lines = future, later_lines or layout.height

    def select(self, positions, scores, finished_line, cfg):
        lines = slice(finished_line + 1, finished_line + 1 + self.later_lines)
        later = self.future[:, :, :, lines].sum(3)  # [L, B, Hkv, keys]
        priority = later.gather(-1, positions.clamp(max=later.shape[-1] - 1))
        return super().select(positions, priority, finished_line, cfg)


@click.command()
@click.option("--budgets", default="1/2,1/4,1/8", show_default=True)
@click.option("--heldout", type=int, default=100, show_default=True)
@click.option("--real", type=int, default=200, show_default=True,
              help="Where the held-out images start (eval's --real).")
@click.option("--later-lines", type=int, default=0, show_default=True,
              help="How many later lines the oracle reads (0: all of them).")
def main(budgets: str, heldout: int, real: int, later_lines: int) -> None:
    subject = demo_subject(heldout, real, seed=0)
    engine = subject.engine
    layout = engine.layout
    labels = list(subject.heldout_labels)
    settings = EvalSettings(batch_size=heldout)  # one batch: the oracle's rows are the images
    future = future_attention(engine.model, subject.heldout_tokens, labels)

    def nll(policy: Policy) -> float:
        return teacher_forced_nll(engine, subject.heldout_tokens, labels, policy, settings,
                                  None).mean().item()

    full = nll(Policy(PolicyConfig("full"), layout))
    print(f"full NLL {full:.4f} nats/token on {heldout} held-out images")
    for budget in budgets.split(","):
        tokens = parse_budget(budget, layout)
        row = []
        for name, policy in (
            ("oracle", OraclePolicy(PolicyConfig("linear", budget=tokens), layout, future,
                                    later_lines)),
            ("linear", Policy(PolicyConfig("linear", budget=tokens), layout)),
            ("window", Policy(PolicyConfig("window", budget=tokens), layout)),
        ):
            row.append(f"{name} {100 * (nll(policy) / full - 1):+.2f}%")
        print(f"{budget}: " + ", ".join(row))


if __name__ == "__main__":
    main()
