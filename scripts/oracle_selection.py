"""How good can any LineAR-style selection be on the demo model? An oracle bound.

The oracle keeps, at each line end, the slots the full cache's attention of *all later
lines* uses most (per layer and kv head, the budget's usual recent line always kept). It
reads the future, so it is no policy; it only bounds what scoring can reach at a budget.
It prints the held-out ΔNLL of the oracle beside LineAR's and window's, as `eval` measures it.
`--later-lines 1` makes it read the next line only.

`--pool-heads` also bounds budgets that differ between a layer's kv heads (the same total):
the runtime cannot run those (every head holds cache_len slots), so that oracle's NLL comes
from a teacher-forced forward pass with each head's visibility mask. The same pass with the
uniform oracle's masks is printed too, as a check that it agrees with the runtime.

    python scripts/oracle_selection.py --budgets 1/2,1/4,1/8 --heldout 100 [--pool-heads]
"""

from __future__ import annotations

import math

import click
import torch
import torch.nn.functional as F

from linear_export.cli.eval import demo_subject
from linear_export.evaluation.sweep import EvalSettings, teacher_forced_nll
from linear_export.models.gpt import GPT
from linear_export.runtime.budget import parse_budget
from linear_export.runtime.policies import Policy, PolicyConfig


def teacher_sequence(model: GPT, tokens: torch.Tensor, labels: list[int]):
    """Image codes [B, N], the whole sequence's ids (class token first) and its RoPE tables."""
    images = tokens.reshape(len(labels), -1)
    ids = torch.cat([torch.tensor(labels)[:, None] + model.config.vocab_size, images], 1)
    return images, ids, model.rope[torch.arange(ids.shape[1]).expand_as(ids)]


@torch.inference_mode()
def future_attention(model: GPT, tokens: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """[L, B, Hkv, lines, keys]: attention each image line's queries pay each key (full cache)."""
    config, layout = model.config, model.layout
    _, ids, cos_sin = teacher_sequence(model, tokens, labels)
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


def ranking_lines(finished_line: int, count: int) -> slice:
    """The image lines after `finished_line` whose attention ranks the keys (0: all)."""
    return slice(finished_line + 1, finished_line + 1 + count if count else None)


class OraclePolicy(Policy):
    """LineAR's selection with priorities from the future's attention instead of scores."""

    def __init__(self, config: PolicyConfig, layout, future: torch.Tensor, later_lines: int):
        super().__init__(config, layout)
        self.future, self.later_lines = future, later_lines

    def select(self, positions, scores, finished_line, cfg):
        later = self.future[:, :, :, ranking_lines(finished_line, self.later_lines)].sum(3)
        priority = later.gather(-1, positions.clamp(max=later.shape[-1] - 1))
        return super().select(positions, priority, finished_line, cfg)


def oracle_visibility(future: torch.Tensor, policy: Policy, pool_heads: bool,
                      count: int = 0) -> torch.Tensor:
    """[L, B, Hkv, N, N] bool: the keys each query sees under the oracle's evictions.

    Line f's eviction (after its last token is cached) hides keys from the queries of lines
    f + 1 on; evicted keys never come back. `pool_heads`: a layer's kv heads share one budget.
    `count`: how many later lines' attention ranks the keys (0: all of them).
    """
    layout = policy.layout
    layers, batch, heads = future.shape[:3]
    length, prefix, width = layout.length, layout.prefix, layout.width
    image_index = torch.arange(length) - prefix
    visible = torch.ones(length, length, dtype=torch.bool).tril().repeat(layers, batch, heads,
                                                                          1, 1)
    alive = torch.ones(layers, batch, heads, length, dtype=torch.bool)
    for finished in range(layout.height - 1):
        newest = (finished + 1) * width - 1
        cached = alive & (image_index <= newest)
        if int((cached & (image_index >= 0)).sum(-1).max()) <= policy.budget:
            continue
        priority = future[:, :, :, ranking_lines(finished, count)].sum(3)[..., :length]
        recent = image_index > newest - policy.recent_lines * width
        priority = priority.masked_fill((image_index < 0) | recent, math.inf)
        priority = priority.masked_fill(~cached, -math.inf)
        keep = prefix + policy.budget
        if pool_heads:
            flat = priority.flatten(2)
            kept = torch.zeros_like(flat).scatter_(-1, flat.topk(heads * keep).indices, 1)
            kept = kept.view_as(priority).bool()
        else:
            kept = torch.zeros_like(priority).scatter_(-1, priority.topk(keep).indices, 1).bool()
        alive = (kept & cached) | (image_index > newest)
        visible[..., prefix + newest + 1:, :] &= alive[..., None, :]
    return visible


@torch.inference_mode()
def masked_nll(model: GPT, tokens: torch.Tensor, labels: list[int],
               visible: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced NLL per image [B] with per-(layer, kv head) visibility (None: causal)."""
    config, layout = model.config, model.layout
    images, ids, cos_sin = teacher_sequence(model, tokens, labels)
    group = config.n_head // config.kv_heads
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    hidden = model.embed(ids)
    for index, layer in enumerate(model.layers):
        x = layer.attention_norm(hidden)
        q, k, v = layer.attention.project(x, cos_sin)
        mask = causal if visible is None else visible[index].repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                             v.repeat_interleave(group, dim=1), attn_mask=mask)
        hidden = hidden + layer.attention.wo(out.transpose(1, 2).flatten(2))
        hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
    logits = model.output(model.norm(hidden)).float()[:, layout.prefix - 1:-1]
    picked = logits.log_softmax(-1).gather(-1, images[..., None])[..., 0]
    return -picked.double().mean(1)


@click.command()
@click.option("--budgets", default="1/2,1/4,1/8", show_default=True)
@click.option("--heldout", type=int, default=100, show_default=True)
@click.option("--real", type=int, default=200, show_default=True,
              help="Where the held-out images start (eval's --real).")
@click.option("--later-lines", type=int, default=0, show_default=True,
              help="How many later lines the oracle reads (0: all of them).")
@click.option("--pool-heads", is_flag=True,
              help="Also bound budgets that differ between a layer's kv heads (masked forward).")
def main(budgets: str, heldout: int, real: int, later_lines: int, pool_heads: bool) -> None:
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
        if pool_heads:
            model, heldout_tokens = engine.model, subject.heldout_tokens
            masked_full = masked_nll(model, heldout_tokens, labels, None).mean().item()
            policy = Policy(PolicyConfig("linear", budget=tokens), layout)
            for name, pool in (("oracle (masked forward)", False), ("oracle, heads pooled", True)):
                visible = oracle_visibility(future, policy, pool, later_lines)
                value = masked_nll(model, heldout_tokens, labels, visible).mean().item()
                row.append(f"{name} {100 * (value / masked_full - 1):+.2f}%")
        print(f"{budget}: " + ", ".join(row))


if __name__ == "__main__":
    main()
