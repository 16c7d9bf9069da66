"""Evaluate the cache policies against the full cache: on the bundled demo model (with its
judge and real data) or on another family's model and prompts."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engines import make_engine
from ..errors import UserError
from ..evaluation.report import kept_cells_plot, markdown_table, metrics_plot, sample_grids
from ..evaluation.sweep import EvalResult, EvalSettings, EvalSubject, run_sweep
from ..models.families import FAMILIES
from ..outputs import json_bytes
from .models import prompt_conditions

FAMILY_CFG_SCALE = 3.0
Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalModel:
    """What `evaluate` runs: the demo (family "demo") or another family's model."""

    family: str = "demo"
    engine: str = "torch"  # demo: torch, or ort on a full-capacity artifact of the demo GPT
    weights: str = "fp32"  # demo --engine ort: the artifact's weight format
    heldout: int = 100  # demo: held-out real images for the teacher-forced NLL
    real: int = 500  # demo: real images for the Frechet reference
    checkpoint: str | None = None  # other families: the model (directory)
    model: str = "GPT-B"
    image_size: int = 256
    max_prompt_tokens: int = 128
    prompts: tuple[str, ...] = ()
    caption_features: tuple[str, ...] = ()


def evaluate(model: EvalModel, settings: EvalSettings, *, progress: bool = False,
             log: Log = lambda line: None) -> EvalResult:
    """Every policy and budget of `settings` against the full cache on `model`."""
    if model.family != "demo" and model.family not in FAMILIES[1:]:
        raise UserError(f"Unknown --family '{model.family}'; choose demo or one of: "
                        f"{', '.join(FAMILIES[1:])}.")
    if settings.head_budgets is not None and model.family != "demo":
        raise UserError(f"--head-budgets runs on LlamaGen class-to-image models for now, not "
                        f"--family {model.family}; drop it.")
    if model.engine != "torch" and model.family != "demo":
        raise UserError(f"--engine {model.engine} runs the demo model's eval; --family "
                        f"{model.family} runs on the torch engine.")
    with tempfile.TemporaryDirectory(prefix="le-eval.") as work:
        if model.family == "demo":
            subject = demo_subject(model.heldout, model.real, settings.seed, functools.partial(
                demo_engine, engine=model.engine, weight_format=model.weights,
                workdir=Path(work), rows=2 * settings.batch_size, log=log))
        else:
            subject = family_subject(model, settings.samples_per_class, settings.seed, log)
        return run_sweep(subject, settings, progress=progress)


def eval_files(settings: EvalSettings, result: EvalResult) -> dict[str, bytes]:
    """eval.json, eval.md, metrics.png, the sample grids and kept_cells.png."""
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
    return files


def demo_engine(gpt, engine: str, weight_format: str, workdir: Path, rows: int,
                log: Log):
    """The demo GPT on `engine`: ort runs an artifact built (full capacity, so every policy
    fits in it) into `workdir` with `weight_format` weights."""
    if engine == "torch":
        if weight_format != "fp32":
            raise UserError(f"--weights {weight_format} is a weight format of ONNX Runtime "
                            "artifacts; pass --engine ort with it.")
        return make_engine("torch", gpt)
    from ..export.artifact import build_artifact

    log(f"building the demo GPT's ort artifact ({weight_format} weights)")
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


def family_subject(model: EvalModel, per_prompt: int, seed: int, log: Log) -> EvalSubject:
    """Another family's model on the torch engine; its prompts (or seeded ones) repeated.

    No decoder, judge or real data: accuracy and FD are not measured, and the teacher-forced
    NLL is taken on the full cache's own samples.
    """
    from ..models.families import load_step_model

    loaded = load_step_model(model.family, checkpoint=model.checkpoint, model_name=model.model,
                             image_size=model.image_size, seed=seed,
                             max_prompt_tokens=model.max_prompt_tokens)
    engine = make_engine("torch", loaded)
    if model.prompts or model.caption_features:
        given = prompt_conditions(engine, model.prompts, model.caption_features,
                                  model.checkpoint)
    else:
        log(f"note: no --prompt given; evaluating on 4 seeded stand-in {model.family} "
            "conditions.")
        given = loaded.family.example_conditions(4, seed)
    conditions = [condition for condition in given for _ in range(per_prompt)]
    return EvalSubject(engine, None, None, None, None, None, conditions)
