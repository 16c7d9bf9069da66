"""`linear-export eval`: quality of every cache policy and budget against the full cache."""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import click
import torch

from ..engines import make_engine
from ..errors import UserError
from ..evaluation.report import kept_cells_plot, markdown_table, metrics_plot, sample_grids
from ..evaluation.sweep import EvalSettings, EvalSubject, run_sweep
from ..export.quantize import WEIGHT_FORMATS
from ..models.families import FAMILIES
from ..outputs import check_writable, json_bytes, write_directory
from ..runtime.head_budgets import load_head_budgets
from ..runtime.policies import POLICIES, PolicyConfig
from ..runtime.sampling import SamplingConfig
from .generate import DEMO_CFG_SCALE
from .options import RECENT_LINES_HELP

FAMILY_CFG_SCALE = 3.0
QUICK = {"samples_per_class": 1, "heldout": 5, "real": 20, "budgets": ("1/1", "1/4"),
         "policies": ("full", "linear")}


def demo_engine(gpt, engine: str, weight_format: str, workdir: Path, rows: int):
    """The demo GPT on `engine`: ort runs an artifact built (full capacity, so every policy
    fits in it) into `workdir` with `weight_format` weights."""
    if engine == "torch":
        if weight_format != "fp32":
            raise UserError(f"--weights {weight_format} is a weight format of ONNX Runtime "
                            "artifacts; pass --engine ort with it.")
        return make_engine("torch", gpt)
    from ..export.artifact import build_artifact

    click.echo(f"building the demo GPT's ort artifact ({weight_format} weights)", err=True)
    artifact = build_artifact(
        gpt, workdir / "demo-artifact", model_name="GPT-demo",
        image_size=gpt.layout.height * gpt.config.downsample, weights={"source": "demo"},
        capacity=gpt.family.token_layout(gpt.layout).length, build_options={"eval": True},
        max_batch=max(64, rows), split_cache=True, weight_format=weight_format)
    return make_engine("ort", artifact=artifact.path)


def demo_subject(heldout: int, real: int, seed: int, engine=None) -> EvalSubject:
    """The bundled demo: GPT, VQ tokenizer, classifier judge, held-out procedural images.

    `engine(gpt)`: what runs the GPT (default: the torch engine)."""
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

    return EvalSubject(engine(gpt) if engine else make_engine("torch", gpt), vq.decode_codes,
                       judge, real_images, heldout_tokens, nll_labels)


def family_subject(family: str, checkpoint: str | None, model_name: str, image_size: int,
                   max_prompt_tokens: int, prompts: tuple[str, ...],
                   caption_features: tuple[str, ...], per_prompt: int, seed: int) -> EvalSubject:
    """Another family's model on the torch engine; its prompts (or seeded ones) repeated.

    No decoder, judge or real data: accuracy and FD are not measured, and the teacher-forced
    NLL is taken on the full cache's own samples.
    """
    from ..models.families import load_step_model
    from .family_generate import conditions_for

    model = load_step_model(family, checkpoint=checkpoint, model_name=model_name,
                            image_size=image_size, seed=seed,
                            max_prompt_tokens=max_prompt_tokens)
    if prompts or caption_features:
        given = conditions_for(family, model.family, checkpoint, prompts, caption_features,
                               image_size)
    else:
        click.echo(f"note: no --prompt given; evaluating on 4 seeded stand-in {family} "
                   "conditions.", err=True)
        given = model.family.example_conditions(4, seed)
    conditions = [condition for condition in given for _ in range(per_prompt)]
    return EvalSubject(make_engine("torch", model), None, None, None, None, None, conditions)


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
@click.option("--cfg-scale", type=float, default=None,
              help=f"Guidance for generated samples [default: {DEMO_CFG_SCALE} for the demo "
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
                   "every evicting budget swept (a head-shared cache pool).")
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
    if family != "demo" and family not in FAMILIES[1:]:
        raise UserError(f"Unknown --family '{family}'; choose demo or one of: "
                        f"{', '.join(FAMILIES[1:])}.")
    if head_budgets is not None and family != "demo":
        raise UserError(f"--head-budgets runs on LlamaGen class-to-image models for now, not "
                        f"--family {family}; drop it.")
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
        cfg_scale = DEMO_CFG_SCALE if family == "demo" else FAMILY_CFG_SCALE
    settings = EvalSettings(
        policies=split_list(policies), budgets=split_list(budgets),
        samples_per_class=samples_per_class, batch_size=batch_size, seed=seed,
        sampling=SamplingConfig(cfg_scale=cfg_scale, top_k=top_k, temperature=temperature),
        knobs=knobs, head_budgets=head_budgets,
    )
    if engine != "torch" and family != "demo":
        raise UserError(f"--engine {engine} runs the demo model's eval; --family {family} "
                        "runs on the torch engine.")
    with tempfile.TemporaryDirectory(prefix="le-eval.") as work:
        if family == "demo":
            subject = demo_subject(heldout, real, seed, functools.partial(
                demo_engine, engine=engine, weight_format=weight_format, workdir=Path(work),
                rows=2 * batch_size))
        else:
            subject = family_subject(family, checkpoint, model_name, image_size,
                                     max_prompt_tokens, prompts, caption_features,
                                     samples_per_class, seed)
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
