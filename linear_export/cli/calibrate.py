"""`linear-export calibrate`: per-head budgets (and position prior) for a model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import api
from ..api.calibrate import SOURCES, CalibrationSettings
from ..outputs import check_writable
from ..runtime.budget import BUDGET_HELP
from ..runtime.policies import PolicyConfig
from .options import RECENT_LINES_HELP, split_list


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
              help=f"Guidance of the samples [default: {api.DEFAULT_CFG_SCALE}; "
                   f"{api.DEMO_CFG_SCALE} for the demo model].")
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
    artifact built with build --head-budgets and the same file).

    Example: linear-export calibrate --checkpoint c2i_B_256.pt --model GPT-B --budgets
    1/4,1/6 --out gpt-b.head-budgets.safetensors
    """
    check_writable(out, force)
    demo = checkpoint is None and not random_weights
    model = api.ModelSource(checkpoint=checkpoint, random_weights=random_weights, seed=seed,
                            model=model_name or "GPT-B", image_size=image_size or 256)
    if demo:
        model = api.demo_source(model, model_given=model_name is not None,
                                image_size_given=image_size is not None)
    settings = CalibrationSettings(split_list(budgets), recent_lines, anchor, lookahead,
                                   position_prior, images, source, cfg_scale, batch_size, seed)
    tables = api.calibrate(model, settings, progress=sys.stderr.isatty(),
                       log=lambda line: click.echo(line, err=True))
    tables.save(out)
    click.echo(f"wrote per-head budgets for {len(tables.tables)} budget(s) to {out}")
