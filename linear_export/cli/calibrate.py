"""`linear-export calibrate`: per-head budgets for a model, for the head-shared cache pool."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from ..engines import make_engine
from ..errors import UserError
from ..evaluation.oracle import calibrate_head_budgets
from ..evaluation.position_prior import WEIGHTS, PositionPrior, calibrate_position_prior
from ..models import get_config, load_gpt
from ..models.configs import SequenceLayout
from ..outputs import check_writable
from ..runtime.budget import BUDGET_HELP
from ..runtime.generate import generate
from ..runtime.head_budgets import HeadBudgets
from ..runtime.policies import Policy, PolicyConfig
from ..runtime.sampling import SamplingConfig
from .eval import split_list
from .generate import DEFAULT_CFG_SCALE, DEMO_CFG_SCALE
from .options import RECENT_LINES_HELP, build_policy

SOURCES = ("auto", "samples", "demo-data")
DEMO_CALIBRATION_START = 1000  # held-out demo images from here on: none that eval scores


@click.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="LlamaGen c2i GPT checkpoint [default: the bundled demo model].")
@click.option("--model", "model_name", default=None,
              help="Model config [default: GPT-B, or the demo's].")
@click.option("--random-weights", is_flag=True, help="Seeded random weights (tests).")
@click.option("--image-size", type=int, default=None,
              help="Image side in pixels [default: 256, or the demo's].")
@click.option("--budgets", default="1/2,1/4,1/6,1/8", show_default=True,
              help=f"Budgets to make tables for, comma-separated; each is {BUDGET_HELP}.")
@click.option("--recent-lines", type=int, default=None, help=RECENT_LINES_HELP)
@click.option("--anchor", type=int, default=PolicyConfig.anchor, show_default=True,
              help="linear: first image tokens always kept.")
@click.option("--lookahead", type=int, default=None,
              help="linear: lines ahead LineAR's scores look, which the position prior is "
                   "weighed against [default: 4, LineAR's default with --head-budgets].")
@click.option("--position-prior/--no-position-prior", default=True, show_default=True,
              help="Also calibrate the position prior: per head, where later lines read on "
                   "average, blended into LineAR's ranking where it lowers the calibration "
                   "images' NLL (minutes per budget where the table takes seconds: one "
                   "masked forward pass over the images per head it tries).")
@click.option("--images", type=int, default=100, show_default=True,
              help="Images the budgets are averaged over.")
@click.option("--source", type=click.Choice(SOURCES), default="auto", show_default=True,
              help="samples: the model's own full-cache samples (any model); demo-data: "
                   "held-out demo images the eval does not score (the demo model only); "
                   "auto: demo-data for the demo model, samples otherwise.")
@click.option("--cfg-scale", type=float, default=None,
              help=f"Guidance of the samples [default: {DEFAULT_CFG_SCALE}; {DEMO_CFG_SCALE} "
                   "for the demo model].")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Images per pass; the oracle holds L x B x Hkv x N x N booleans per pass.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the samples (and of random weights).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Head budgets file to write (.safetensors).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
def calibrate(checkpoint, model_name, random_weights, image_size, budgets, recent_lines, anchor,
              lookahead, position_prior, images, source, cfg_scale, batch_size, seed, out,
              force) -> None:
    """Calibrate per-head budgets: how many slots each kv head keeps after each line.

    LineAR's uniform budget gives every (layer, kv head) the same slots; a model's heads
    differ. The table comes from an oracle that sees the full cache's future attention on
    --images images and lets each layer's heads share its slots; its mean counts become the
    table. With the position prior (default), the heads whose later lines read the same
    places in every image also rank their keys partly by that average. Run it once per model,
    then pass the file to generate or eval with --head-budgets (the ort engine needs an
    artifact built with --head-shared).

    Example: linear-export calibrate --checkpoint c2i_B_256.pt --model GPT-B --budgets
    1/4,1/6 --out gpt-b.head-budgets.safetensors
    """
    check_writable(out, force)
    if images < 1 or batch_size < 1:
        raise UserError("--images and --batch-size must be at least 1.")
    demo = checkpoint is None and not random_weights
    if demo:
        from ..demo import DEMO_DIR, DEMO_IMAGE_SIZE, DEMO_MODEL_NAME

        checkpoint = str(DEMO_DIR / "gpt.safetensors")
        model_name, image_size = model_name or DEMO_MODEL_NAME, image_size or DEMO_IMAGE_SIZE
    model_name, image_size = model_name or "GPT-B", image_size or 256
    if source == "auto":
        source = "demo-data" if demo else "samples"
    if source == "demo-data" and not demo:
        raise UserError("--source demo-data holds the demo model's images; for your model use "
                        "--source samples.")
    config = get_config(model_name)
    layout = SequenceLayout.for_image(config, image_size)
    knobs = {"recent_lines": recent_lines, "anchor": anchor, "lookahead": lookahead}
    policies = [build_policy(layout, "linear", budget, **knobs) for budget in split_list(budgets)]
    if not policies:
        raise UserError("--budgets is empty; give budgets such as 1/4,1/6.")
    model = load_gpt(model_name, image_size, checkpoint, seed=seed)
    tokens, labels = _calibration_images(model, source, images, cfg_scale, seed, demo)
    progress = sys.stderr.isatty()
    tables, kept_knobs, priors = {}, {}, {}
    for policy in policies:
        if not policy.evicts:
            click.echo(f"budget {policy.budget} tokens keeps the whole image: no table needed",
                       err=True)
            continue
        with tqdm(total=images, unit="image", disable=not progress, leave=False,
                  desc=f"budget {policy.budget}") as bar:
            tables[policy.budget] = calibrate_head_budgets(model, tokens, labels, policy,
                                                           batch_size, bar.update)
        pooled = Policy(replace(policy.config, head_budgets=tables[policy.budget]), layout)
        kept_knobs[policy.budget] = {"recent_lines": policy.recent_lines, "anchor": anchor,
                                     "lookahead": pooled.lookahead}
        click.echo(_summary(tables[policy.budget], policy))
        if position_prior:
            with tqdm(total=images, unit="image", disable=not progress, leave=False,
                      desc=f"prior {policy.budget}") as bar:
                priors[policy.budget] = calibrate_position_prior(model, tokens, labels, pooled,
                                                                 batch_size, bar.update)
            click.echo(_prior_summary(priors[policy.budget]))
    if not tables:
        raise UserError("No budget given evicts anything; give budgets below the whole image.")
    HeadBudgets(tables, (layout.height, layout.width), config.n_layer, config.kv_heads,
                kept_knobs, source=f"{source}, {images} images, seed {seed}",
                priors={tokens: found.prior for tokens, found in priors.items()},
                prior_weights={tokens: found.weight for tokens, found in priors.items()},
                ).save(out)
    click.echo(f"wrote per-head budgets for {len(tables)} budget(s) to {out}")


def _calibration_images(model, source: str, images: int, cfg_scale: float | None, seed: int,
                        demo: bool) -> tuple[torch.Tensor, list[int]]:
    """Token grids [n, h, w] and their classes: the demo's held-out data, or own samples."""
    classes = model.config.num_classes
    if source == "demo-data":
        from ..demo import load_demo_vq
        from ..demo.blocks import encode_blocks
        from ..demo.dataset import dataset_split

        pictures, labels = dataset_split("heldout", images, start=DEMO_CALIBRATION_START)
        with torch.inference_mode():
            return encode_blocks(load_demo_vq(), pictures), labels.tolist()
    labels = [index % classes for index in range(images)]
    if cfg_scale is None:
        cfg_scale = DEMO_CFG_SCALE if demo else DEFAULT_CFG_SCALE
    sampling = SamplingConfig(cfg_scale=cfg_scale)
    engine, full = make_engine("torch", model), Policy(PolicyConfig("full"), model.layout)
    click.echo(f"sampling {images} images with the full cache (CFG {cfg_scale})", err=True)
    grids = [generate(engine, labels[start:start + 16], full, sampling, seed=seed + start,
                      progress=sys.stderr.isatty()).tokens
             for start in range(0, images, 16)]
    return torch.cat(grids), labels


def _summary(table: torch.Tensor, policy: Policy) -> str:
    """One line per budget: how unevenly the heads share, at the middle eviction."""
    line = (table.shape[0] + policy.budget // policy.layout.width) // 2
    middle = table[min(line, table.shape[0] - 1)]
    spread = ", ".join(f"L{layer} {int(row.min())}-{int(row.max())}"
                       for layer, row in enumerate(middle))
    return (f"budget {policy.budget} tokens per head: after line {min(line, table.shape[0] - 1)}"
            f" the heads keep {spread}")


def _prior_summary(found: PositionPrior) -> str:
    """Which heads lean on the prior, and what it did to the calibration images' NLL."""
    heads = [f"L{layer}H{head} " + (f"{weight:g}" if weight < WEIGHTS[-1] else "alone")
             for layer, head in found.weight.nonzero().tolist()
             for weight in [float(found.weight[layer, head])]]
    change = 100 * (found.nll_after / found.nll_before - 1) if found.nll_before else 0.0
    return (f"  position prior on {len(heads)} of {found.weight.numel()} heads"
            f"{': ' + ', '.join(heads) if heads else ''} (emulated NLL {change:+.2f}%)")
