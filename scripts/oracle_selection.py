"""How good can any LineAR-style selection be on the demo model? An oracle bound.

The oracle keeps, at each line end, the slots the full cache's attention of *all later
lines* uses most (per layer and kv head, the budget's usual recent line always kept). It
reads the future, so it is no policy; it only bounds what scoring can reach at a budget.
It prints the held-out ΔNLL of the oracle beside LineAR's and window's, as `eval` measures it.
`--later-lines 1` makes it read the next line only.

`--pool-heads` also bounds budgets that differ between a layer's kv heads (the same total):
the runtime cannot run those (every head holds cache_len slots), so that oracle's NLL comes
from a teacher-forced forward pass with each head's visibility mask. The same pass with the
uniform oracle's masks is printed too, as a check that it agrees with the runtime. With it,
the same pass also runs the oracle with *fixed* per-head budgets: how many slots each
(line, layer, kv head) keeps, averaged from the pooled oracle on other images
(`--calibration-start`), as a static allocation would be shipped with a model.

`--blame` asks where LineAR's ranking loses: the oracle's selection everywhere, except
LineAR's own scores in one (layer, kv head) at a time, through the runtime.

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
    """LineAR's selection with priorities from the future's attention instead of scores.

    `linear_heads`: (layer, kv head) pairs that keep LineAR's own scores (for --blame).
    """

    def __init__(self, config: PolicyConfig, layout, future: torch.Tensor, later_lines: int,
                 linear_heads: tuple[tuple[int, int], ...] = ()):
        super().__init__(config, layout)
        self.future, self.later_lines, self.linear_heads = future, later_lines, linear_heads

    def select(self, positions, scores, finished_line, cfg):
        later = self.future[:, :, :, ranking_lines(finished_line, self.later_lines)].sum(3)
        priority = later.gather(-1, positions.clamp(max=later.shape[-1] - 1)).to(scores)
        for layer, head in self.linear_heads:
            priority[layer, :, head] = scores[layer, :, head]
        return super().select(positions, priority, finished_line, cfg)


def oracle_visibility(future: torch.Tensor, policy: Policy, allocation: str | torch.Tensor,
                      count: int = 0) -> torch.Tensor:
    """[L, B, Hkv, N, N] bool: the keys each query sees under the oracle's evictions.

    Line f's eviction (after its last token is cached) hides keys from the queries of lines
    f + 1 on; evicted keys never come back. `allocation`: "uniform" (every head keeps the
    budget), "pooled" (a layer's kv heads share one budget) or fixed image tokens per head
    after each line, [lines, L, Hkv]. `count`: how many later lines' attention ranks the keys
    (0: all of them).
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
        if isinstance(allocation, torch.Tensor):
            order = priority.argsort(-1, descending=True)
            ranks = torch.arange(length).expand_as(order)
            rank = torch.empty_like(order).scatter_(-1, order, ranks)
            kept = rank < prefix + allocation[finished][:, None, :, None]
        elif allocation == "pooled":
            flat = priority.flatten(2)
            kept = torch.zeros_like(flat).scatter_(-1, flat.topk(heads * keep).indices, 1)
            kept = kept.view_as(priority).bool()
        else:
            kept = torch.zeros_like(priority).scatter_(-1, priority.topk(keep).indices, 1).bool()
        alive = (kept & cached) | (image_index > newest)
        visible[..., prefix + newest + 1:, :] &= alive[..., None, :]
    return visible


def static_budgets(pooled: torch.Tensor, policy: Policy) -> torch.Tensor:
    """[lines - 1, L, Hkv] image tokens each head keeps after each line but the last: the
    pooled oracle's mean over its images ([L, B, Hkv, N, N] visibility), rounded per layer."""
    layout = policy.layout
    prefix, width, heads = layout.prefix, layout.width, pooled.shape[2]
    budgets = []
    for finished in range(layout.height - 1):
        cached = (finished + 1) * width
        if cached <= policy.budget:  # nothing evicted yet
            budgets.append(torch.full((pooled.shape[0], heads), cached))
            continue
        first_query = prefix + cached
        share = pooled[..., first_query, prefix:first_query].sum(-1).float().mean(1)
        budgets.append(_round_per_layer(share, heads * policy.budget,
                                        policy.recent_lines * width, cached))
    return torch.stack(budgets)


def _round_per_layer(share: torch.Tensor, total: int, low: int, high: int) -> torch.Tensor:
    """Integers within [low, high] proportional to `share` [L, Hkv], each row summing to total."""
    target = share.clamp(min=low)
    target = target / target.sum(-1, keepdim=True) * total
    counts = target.floor().long().clamp(low, high)
    for row, wanted in zip(counts, target, strict=True):  # largest remainders first
        while int(row.sum()) != total:
            step = 1 if int(row.sum()) < total else -1
            room = (row < high) if step > 0 else (row > low)
            gap = (wanted - row) * step
            row[gap.masked_fill(~room, -math.inf).argmax()] += step
    return counts


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
@click.option("--calibration-start", type=int, default=1000, show_default=True,
              help="With --pool-heads: where the images that fix per-head budgets start.")
@click.option("--blame", is_flag=True,
              help="Also the oracle with LineAR's scores in one (layer, kv head) at a time.")
def main(budgets: str, heldout: int, real: int, later_lines: int, pool_heads: bool,
         calibration_start: int, blame: bool) -> None:
    subject = demo_subject(heldout, real, seed=0)
    engine = subject.engine
    layout, model = engine.layout, engine.model
    labels, heldout_tokens = list(subject.heldout_labels), subject.heldout_tokens
    settings = EvalSettings(batch_size=heldout)  # one batch: the oracle's rows are the images
    future = future_attention(model, heldout_tokens, labels)

    def nll(policy: Policy) -> float:
        return teacher_forced_nll(engine, heldout_tokens, labels, policy, settings,
                                  None).mean().item()

    full = nll(Policy(PolicyConfig("full"), layout))
    print(f"full NLL {full:.4f} nats/token on {heldout} held-out images")
    if pool_heads:
        masked_full = masked_nll(model, heldout_tokens, labels, None).mean().item()
        calibration = demo_subject(heldout, calibration_start, seed=0)
        calibration_future = future_attention(model, calibration.heldout_tokens,
                                              list(calibration.heldout_labels))
    for budget in budgets.split(","):
        config = PolicyConfig("linear", budget=parse_budget(budget, layout))
        row = []
        for name, policy in (
            ("oracle", OraclePolicy(config, layout, future, later_lines)),
            ("linear", Policy(config, layout)),
            ("window", Policy(PolicyConfig("window", budget=config.budget), layout)),
        ):
            row.append(f"{name} {100 * (nll(policy) / full - 1):+.2f}%")
        if pool_heads:
            policy = Policy(config, layout)
            pooled = oracle_visibility(calibration_future, policy, "pooled", later_lines)
            fixed = static_budgets(pooled, policy)
            del pooled
            for name, allocation in (("oracle (masked forward)", "uniform"),
                                     ("oracle, heads pooled", "pooled"),
                                     ("oracle, fixed per-head budgets", fixed)):
                visible = oracle_visibility(future, policy, allocation, later_lines)
                value = masked_nll(model, heldout_tokens, labels, visible).mean().item()
                row.append(f"{name} {100 * (value / masked_full - 1):+.2f}%")
        print(f"{budget}: " + ", ".join(row), flush=True)
        if blame:
            heads = range(model.config.kv_heads)
            for layer in range(model.config.n_layer):
                cells = [nll(OraclePolicy(config, layout, future, later_lines, ((layer, head),)))
                         for head in heads]
                print(f"  LineAR's scores in layer {layer}, kv head 0..: " + ", ".join(
                    f"{100 * (value / full - 1):+.2f}%" for value in cells), flush=True)


if __name__ == "__main__":
    main()
