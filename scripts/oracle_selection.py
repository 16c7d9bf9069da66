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

import click
import torch

from linear_export.api.evaluate import demo_subject
from linear_export.evaluation.oracle import (
    calibrate_head_budgets,
    future_attention,
    masked_nll,
    oracle_visibility,
    ranking_lines,
)
from linear_export.evaluation.sweep import EvalSettings, teacher_forced_nll
from linear_export.runtime.budget import parse_budget
from linear_export.runtime.policies import Policy, PolicyConfig


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
            fixed = calibrate_head_budgets(model, calibration.heldout_tokens,
                                           list(calibration.heldout_labels), policy)
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
