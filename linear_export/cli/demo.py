"""`linear-export demo`: the bundled demo model (train it again, reproducibly, on this CPU)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def demo() -> None:
    """The bundled demo model: a tiny class GPT, its VQ tokenizer and a judge CNN."""


@demo.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Directory to write the weights and train_log.json into.")
@click.option("--quick", is_flag=True,
              help="A handful of steps per stage (smoke test, under a minute); useless weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data and weights.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads. On a shared machine 1 is fastest: a second thread "
                   "that must wait for a busy core stalls every parallel op.")
@click.option("--force", is_flag=True, help="Replace --out if it already exists.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars on stderr.")
def train(out: Path, quick: bool, seed: int, threads: int, force: bool, progress: bool) -> None:
    """Train the demo VQ, classifier and GPT from scratch and write them to --out.

    The full run took 59 minutes with --threads 2 on a shared two-core AVX2 CPU (the GPT
    stage is 50 of them); to refresh the shipped weights, pass
    --out linear_export/assets/demo --force.
    """
    from ..demo.train import FULL_PLAN, QUICK_PLAN, run_training

    log = run_training(out, QUICK_PLAN if quick else FULL_PLAN, seed=seed, threads=threads,
                       force=force, progress=progress)
    metrics = log["evaluation"]
    samples = metrics["samples"]
    click.echo(
        f"wrote {out} in {log['total_seconds']:.0f} s: VQ round-trip MSE "
        f"{metrics['vq_roundtrip_mse']:.4f}, classifier {metrics['classifier_accuracy_real']:.1%}, "
        f"GPT held-out NLL {metrics['gpt_heldout_nll']:.3f} (uniform {metrics['log_vocab']:.3f}), "
        f"sample class accuracy {samples['class_accuracy']:.1%} at CFG {samples['cfg_scale']}"
    )
