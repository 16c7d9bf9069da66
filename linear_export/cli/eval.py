"""`linear-export eval`: quality of every cache policy and budget against the full cache."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from ..engines import make_engine
from ..errors import UserError
from ..evaluation.report import kept_cells_plot, markdown_table, metrics_plot, sample_grids
from ..evaluation.sweep import EvalSettings, EvalSubject, run_sweep
from ..outputs import check_writable, json_bytes, write_directory
from ..runtime.policies import POLICIES, PolicyConfig
from ..runtime.sampling import SamplingConfig

QUICK = {"samples_per_class": 1, "heldout": 5, "real": 20, "budgets": ("1/1", "1/4"),
         "policies": ("full", "linear")}


def demo_subject(heldout: int, real: int, seed: int) -> EvalSubject:
    """The bundled demo: GPT, VQ tokenizer, classifier judge, held-out procedural images."""
    from ..demo import load_demo_classifier, load_demo_gpt, load_demo_vq
    from ..demo.blocks import encode_blocks
    from ..demo.dataset import dataset_split

    gpt, vq, classifier = load_demo_gpt(), load_demo_vq(), load_demo_classifier()
    real_images, _ = dataset_split("heldout", real, seed=seed)
    nll_images, nll_labels = dataset_split("heldout", heldout, seed=seed, start=real)
    with torch.inference_mode():
        heldout_tokens = encode_blocks(vq, nll_images)  # how the demo GPT's data was coded

    def judge(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return classifier.logits(images), classifier.features(images)

    return EvalSubject(make_engine("torch", gpt), vq.decode_codes, judge, real_images,
                       heldout_tokens, nll_labels)


def split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@click.command(name="eval")
@click.option("--policies", default=",".join(POLICIES), show_default=True,
              help="Policies to compare (full is always the reference).")
@click.option("--budgets", default="1/2,1/4,1/6,1/8", show_default=True,
              help="Budgets to sweep (see generate --budget).")
@click.option("--samples-per-class", type=int, default=20, show_default=True,
              help="Generated images per class and configuration.")
@click.option("--heldout", type=int, default=100, show_default=True,
              help="Held-out real images for the teacher-forced NLL.")
@click.option("--real", type=int, default=500, show_default=True,
              help="Real images for the Fréchet reference.")
@click.option("--batch-size", type=int, default=50, show_default=True)
@click.option("--cfg-scale", type=float, default=3.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--recent-lines", type=int, default=PolicyConfig.recent_lines, show_default=True)
@click.option("--anchor", type=int, default=PolicyConfig.anchor, show_default=True)
@click.option("--granularity", type=click.Choice(["head", "layer"]),
              default=PolicyConfig.granularity, show_default=True)
@click.option("--cfg-share/--no-cfg-share", default=PolicyConfig.cfg_share, show_default=True)
@click.option("--score-queries", type=int, default=PolicyConfig.score_queries, show_default=True)
@click.option("--quick", is_flag=True,
              help="A small, fast run for CI: full and linear at budgets 1/1 and 1/4, one sample "
                   "per class.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eval"),
              show_default=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def eval_command(policies, budgets, samples_per_class, heldout, real, batch_size, cfg_scale,
                 top_k, temperature, seed, quick, out, force, **knobs) -> None:
    """Evaluate LineAR against full cache, StreamingLLM, H2O and local windows on the demo model.

    Writes eval.json, eval.md, metrics.png, one samples_<policy>.png per policy, and
    kept_cells.png (which grid cells LineAR keeps per layer).
    """
    check_writable(out, force)
    if quick:
        samples_per_class, heldout, real = (QUICK["samples_per_class"], QUICK["heldout"],
                                            QUICK["real"])
        budgets, policies = ",".join(QUICK["budgets"]), ",".join(QUICK["policies"])
    unknown = [name for name in split_list(policies) if name not in POLICIES]
    if unknown:
        raise UserError(f"Unknown policy '{unknown[0]}'; choose from: {', '.join(POLICIES)}.")
    for name, value in (("--samples-per-class", samples_per_class), ("--heldout", heldout),
                        ("--real", real), ("--batch-size", batch_size)):
        if value < 1 or (name == "--real" and value < 4):
            raise UserError(f"{name} {value} is too small; give at least "
                            f"{4 if name == '--real' else 1}.")
    settings = EvalSettings(
        policies=split_list(policies), budgets=split_list(budgets),
        samples_per_class=samples_per_class, batch_size=batch_size, seed=seed,
        sampling=SamplingConfig(cfg_scale=cfg_scale, top_k=top_k, temperature=temperature),
        knobs=knobs,
    )
    subject = demo_subject(heldout, real, seed)
    result = run_sweep(subject, settings, progress=sys.stderr.isatty())
    files = {
        "eval.json": json_bytes({"settings": {**settings.__dict__,
                                              "sampling": settings.sampling.__dict__},
                                 **result.as_json()}),
        "eval.md": markdown_table(result).encode(),
        "metrics.png": metrics_plot(result),
        **sample_grids(result),
    }
    kept = kept_cells_plot(result)
    if kept is not None:
        files["kept_cells.png"] = kept
    write_directory(out, files, force)
    click.echo(markdown_table(result))
    click.echo(f"wrote {len(files)} files to {out}/")
