"""`linear-export eval`: quality of every cache policy and budget against the full cache."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import api
from ..api.evaluate import FAMILY_CFG_SCALE, EvalModel, eval_files, evaluate
from ..errors import UserError
from ..evaluation.report import markdown_table
from ..evaluation.sweep import EvalSettings
from ..export.quantize import WEIGHT_FORMATS
from ..models.families import FAMILIES
from ..outputs import check_writable, write_directory
from ..runtime.head_budgets import load_head_budgets
from ..runtime.policies import POLICIES, PolicyConfig
from ..runtime.sampling import SamplingConfig
from .options import RECENT_LINES_HELP, split_list

QUICK = {"samples_per_class": 1, "heldout": 5, "real": 20, "budgets": ("1/1", "1/4"),
         "policies": ("full", "linear")}


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
@click.option("--cfg-scale", type=float, default=None,
              help=f"Guidance for generated samples [default: {api.DEMO_CFG_SCALE} for the demo "
                   f"model, whose accuracy guidance lowers; {FAMILY_CFG_SCALE} for --family]. "
                   "The NLL is always unguided.")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--recent-lines", type=int, default=None, help=RECENT_LINES_HELP)
@click.option("--anchor", type=int, default=PolicyConfig.anchor, show_default=True)
@click.option("--granularity", type=click.Choice(["head", "layer"]),
              default=PolicyConfig.granularity, show_default=True)
@click.option("--cfg-share/--no-cfg-share", default=PolicyConfig.cfg_share, show_default=True)
@click.option("--score-queries", type=int, default=PolicyConfig.score_queries, show_default=True)
@click.option("--lookahead", type=int, default=None,
              help="linear: score with the queries rotated 1..N lines ahead (0: in place) "
                   "[default: 3; 4 with --head-budgets].")
@click.option("--head-budgets", type=click.Path(dir_okay=False), default=None,
              help="linear: per-head budgets from linear-export calibrate, with a table for "
                   "every evicting budget swept.")
@click.option("--engine", type=click.Choice(["torch", "ort"]), default="torch",
              show_default=True,
              help="Demo model: what runs the GPT; ort builds a full-capacity artifact of it "
                   "first (every policy runs in it, dead slots masked).")
@click.option("--weights", "weight_format", type=click.Choice(WEIGHT_FORMATS), default="fp32",
              show_default=True,
              help="--engine ort: the artifact's weights (build --weights), so quality is "
                   "measured per precision against the fp32 model's full cache.")
@click.option("--quick", is_flag=True,
              help="A small, fast run for CI: full and linear at budgets 1/1 and 1/4, one sample "
                   "per class.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eval"),
              show_default=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--family", default="demo", show_default=True,
              help=f"demo (the bundled model), or another family: "
                   f"{', '.join(f for f in FAMILIES if f != 'llamagen')}.")
@click.option("--checkpoint", type=click.Path(exists=True), default=None,
              help="--family janus/lumina: a local Hugging Face model directory; "
                   "llamagen-t2i: a t2i GPT checkpoint (omitted: random weights).")
@click.option("--model", "model_name", default="GPT-B", show_default=True,
              help="--family llamagen-t2i: the GPT config.")
@click.option("--image-size", type=int, default=256, show_default=True,
              help="--family: image side in pixels.")
@click.option("--max-prompt-tokens", type=int, default=128, show_default=True,
              help="janus/lumina: the prefix capacity (prompt tokens per row).")
@click.option("--prompt", "prompts", multiple=True,
              help="janus/lumina: a prompt (repeatable); --samples-per-class images each.")
@click.option("--caption-features", multiple=True, type=click.Path(dir_okay=False),
              help="llamagen-t2i: T5 caption features per prompt (.npy or .safetensors).")
def eval_command(policies, budgets, samples_per_class, heldout, real, batch_size, cfg_scale,
                 top_k, temperature, seed, quick, out, force, family, checkpoint, model_name,
                 image_size, max_prompt_tokens, prompts, caption_features, head_budgets,
                 engine, weight_format, **knobs) -> None:
    """Evaluate LineAR against full cache, StreamingLLM, H2O and local windows on the demo model.

    Writes eval.json, eval.md, metrics.png, one samples_<policy>.png per policy, and
    kept_cells.png (which grid cells LineAR keeps per layer).

    With --family janus, lumina or llamagen-t2i the same sweep runs on your model and
    prompts: ΔNLL (on the full cache's own samples) and token agreement with full; there is
    no class judge or real data for those, so no accuracy, FD or sample grids.
    """
    check_writable(out, force)
    if head_budgets is not None:
        load_head_budgets(head_budgets)  # a bad file fails before the sweep starts
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
    if cfg_scale is None:
        cfg_scale = api.DEMO_CFG_SCALE if family == "demo" else FAMILY_CFG_SCALE
    settings = EvalSettings(
        policies=split_list(policies), budgets=split_list(budgets),
        samples_per_class=samples_per_class, batch_size=batch_size, seed=seed,
        sampling=SamplingConfig(cfg_scale=cfg_scale, top_k=top_k, temperature=temperature),
        knobs=knobs, head_budgets=head_budgets,
    )
    model = EvalModel(family, engine, weight_format, heldout, real, checkpoint, model_name,
                      image_size, max_prompt_tokens, tuple(prompts), tuple(caption_features))
    result = evaluate(model, settings, progress=sys.stderr.isatty(),
                      log=lambda line: click.echo(line, err=True))
    files = eval_files(settings, result)
    write_directory(out, files, force)
    click.echo(markdown_table(result))
    click.echo(f"wrote {len(files)} files to {out}/")
