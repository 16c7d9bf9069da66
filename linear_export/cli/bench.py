"""`linear-export bench`: engines x policies side by side against LlamaGen's own loop."""

from __future__ import annotations

import io
import json
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path

import click
import torch

from ..errors import UserError
from ..models import DTYPES, GPT_CONFIGS, SequenceLayout, get_config
from ..models.families import FAMILIES, HF_FAMILIES, check_family, load_step_model
from ..outputs import check_writable, json_bytes, write_directory
from ..runtime.bench import (
    BASELINE,
    ORIGINAL,
    BenchConfig,
    MaxBatch,
    Result,
    available_engines,
    max_batch,
    measure,
    parse_size,
)
from ..runtime.bench_artifacts import prepare_artifacts
from ..runtime.original import import_original
from ..runtime.policy_spec import parse_policy

MiB = 2**20
DEFAULTS = {"model": "GPT-B", "image_size": 256, "engines": "torch,ort",
            "policies": "full,linear:1/4,linear:1/6,linear:1/8,streaming:1/4",
            "batch_sizes": "8", "repeats": 3, "warmup_steps": 3, "fit_batches": "1,4",
            "threads": None}
# --quick: a CI smoke test. One thread, because two threads on a busy two-core machine stall
# on every parallel region (measured: 340 ms instead of 1 ms per GPT-tiny step).
QUICK = {"model": "GPT-tiny", "image_size": 24, "engines": "torch",
         "policies": "full,linear:1/3,streaming:1/3", "batch_sizes": "2", "repeats": 1,
         "warmup_steps": 1, "fit_batches": "1,2", "threads": 1}


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UserError(f"{option} '{text}' is not a comma-separated list of positive integers "
                        "such as 1,4.")
    return values


def setting(name: str, given: object, quick: bool) -> object:
    """An option's value: as given, else the --quick or the normal default."""
    return given if given is not None else (QUICK if quick else DEFAULTS)[name]


@click.command()
@click.option("--model", "model_name", default=None,
              help=f"Model config: {', '.join(GPT_CONFIGS)} [default: GPT-B].")
@click.option("--checkpoint", type=click.Path(exists=True), default=None,
              help="LlamaGen GPT checkpoint (omitted: seeded random weights, same speed); "
                   "janus/lumina: a local Hugging Face model directory.")
@click.option("--family", default="llamagen", show_default=True,
              help=f"Model family: {', '.join(FAMILIES)}. Others than llamagen run seeded "
                   "token prompts (or caption features) and no baseline loop.")
@click.option("--max-prompt-tokens", type=int, default=128, show_default=True,
              help="janus/lumina: the prefix capacity (prompt tokens per row).")
@click.option("--image-size", type=int, default=None, help="Image side in pixels [default: 256].")
@click.option("--engines", default=None,
              help="Comma-separated engines: torch, ort, tensorrt [default: torch,ort].")
@click.option("--policies", default=None,
              help="Comma-separated NAME[:BUDGET][:KNOB=VALUE...] specs, e.g. "
                   "linear:1/4:lookahead=0 (knobs: PolicyConfig fields); full is always added "
                   f"[default: {DEFAULTS['policies']}].")
@click.option("--batch-sizes", default=None, help="Comma-separated images per batch [default: 8].")
@click.option("--cfg-scale", type=float, default=4.0, show_default=True,
              help="Classifier-free guidance (doubles the rows); 1.0 disables it.")
@click.option("--top-k", type=int, default=1000, show_default=True, help="Top-k sampling.")
@click.option("--repeats", type=int, default=None,
              help="Runs per configuration, alternating configurations [default: 3].")
@click.option("--warmup-steps", type=int, default=None,
              help="Untimed decode steps before each timed generation [default: 3].")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads of torch and ort per run [default: theirs; 1 with --quick].")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda.")
@click.option("--memory-limit", default=None,
              help="Find each policy's largest batch whose peak RSS stays under this (8GiB).")
@click.option("--fit-batches", default=None,
              help="Two batch sizes the memory model RSS(b) is fitted to [default: 1,4].")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights and sampling seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for bench.json, bench.md and bench.png.")
@click.option("--artifacts-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the ort artifacts here and reuse matching ones [default: temporary].")
@click.option("--cuda-graph", is_flag=True,
              help="torch engine on CUDA: replay each decode step from a CUDA graph.")
@click.option("--llamagen-src", type=click.Path(file_okay=False), default=None,
              help="A local checkout of FoundationVision/LlamaGen: its own generate() is "
                   "timed on the same weights, side by side, and every ratio is against it "
                   "(the row `llamagen`) instead of the project's stand-in loop (`baseline`).")
@click.option("--quick", is_flag=True,
              help="CI smoke test: GPT-tiny 24 px, torch, batch 2, one repeat, one thread.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
def bench(model_name, checkpoint, family, max_prompt_tokens, image_size, engines, policies,
          batch_sizes, cfg_scale, top_k, repeats, warmup_steps, threads, dtype, device,
          memory_limit, fit_batches, seed, out, artifacts_dir, cuda_graph, llamagen_src, quick,
          force) -> None:
    """Measure images/s, step latency, KV bytes and peak memory of engines x policies.

    Every run is a fresh process, configurations alternate within each repeat, and the
    reported numbers are medians. Ratios are against `full` on the same engine and against
    the reference loop: LlamaGen's own generate() with --llamagen-src (`llamagen`), else the
    project's stand-in for it (`baseline`).

    Example: linear-export bench --engines torch,ort --policies full,linear:1/4 --out bench/
    """
    if out is not None:
        check_writable(out, force)
    model_name = setting("model", model_name, quick)
    image_size = setting("image_size", image_size, quick)
    check_family(family, checkpoint)
    if family == "llamagen":
        config = get_config(model_name)
        layout = SequenceLayout.for_image(config, image_size)
        image_size = layout.height * config.downsample
    else:  # the layout comes from the weights: load them once here
        click.echo(f"loading the {family} model to size its policies", err=True)
        model = load_step_model(family, checkpoint=checkpoint, model_name=model_name,
                                image_size=image_size, dtype=dtype, seed=seed,
                                max_prompt_tokens=max_prompt_tokens)
        layout = model.family.token_layout(model.layout)
        del model
    specs = [s.strip() for s in setting("policies", policies, quick).split(",") if s.strip()]
    if "full" not in specs:
        specs.insert(0, "full")  # every ratio needs it
    for spec in specs:
        parse_policy(spec, layout)  # fail on a bad spec before any work
    if setting("repeats", repeats, quick) < 1:
        raise UserError(f"--repeats {repeats} must be at least 1.")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads} must be at least 1.")
    if setting("warmup_steps", warmup_steps, quick) < 0:
        raise UserError(f"--warmup-steps {warmup_steps} must be 0 or more.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but torch sees no CUDA device; use --device cpu.")
    if cuda_graph and not device.startswith("cuda"):
        raise UserError("--cuda-graph needs --device cuda (CUDA graphs exist only on NVIDIA "
                        "GPUs); drop --cuda-graph or pass --device cuda.")
    if llamagen_src is not None:
        if family != "llamagen":
            raise UserError("--llamagen-src times LlamaGen's class-to-image generate(); it "
                            f"does not run --family {family}.")
        import_original(llamagen_src)  # a clear error now, not in every child
    fit = parse_ints(setting("fit_batches", fit_batches, quick), "--fit-batches")
    if len(set(fit)) != 2:
        raise UserError(f"--fit-batches '{fit_batches}' must be two different batch sizes such "
                        "as 1,4.")
    chosen, skipped = available_engines(setting("engines", engines, quick), device)
    if family == "llamagen-t2i" and "tensorrt" in chosen:  # its prefill takes features
        chosen.remove("tensorrt")
        skipped["tensorrt"] = ("the TensorRT engine does not run llamagen-t2i's caption-features "
                               "prefill yet")
        if not chosen:
            raise UserError("--family llamagen-t2i runs on the torch and ort engines; add one "
                            "of them to --engines.")
    for name, reason in skipped.items():
        click.echo(f"skipping engine {name}: {reason}", err=True)
    bench_config = BenchConfig(
        model=model_name if family not in HF_FAMILIES else Path(checkpoint).name,
        checkpoint=checkpoint, family=family, max_prompt_tokens=max_prompt_tokens,
        image_size=image_size,
        engines=tuple(chosen), policies=tuple(specs),
        batch_sizes=parse_ints(setting("batch_sizes", batch_sizes, quick), "--batch-sizes"),
        cfg_scale=cfg_scale, top_k=top_k, repeats=setting("repeats", repeats, quick),
        dtype=dtype, device=device, seed=seed,
        warmup_steps=setting("warmup_steps", warmup_steps, quick),
        threads=setting("threads", threads, quick),
        memory_limit=None if memory_limit is None else parse_size(memory_limit),
        fit_batches=tuple(sorted(fit)), artifacts_dir=artifacts_dir, cuda_graph=cuda_graph,
        llamagen_src=None if llamagen_src is None else str(Path(llamagen_src).resolve()),
    )
    progress = sys.stderr.isatty()
    with prepare_artifacts(bench_config, log=lambda line: click.echo(line, err=True)) as paths:
        bench_config = replace(bench_config, artifacts=paths)
        try:
            results = measure(bench_config, progress=progress)
            limits = search_max_batches(bench_config, results)
        except RuntimeError as error:
            raise UserError(f"A benchmark run failed: {error}") from None
    report = {
        "schema_version": 1,
        "config": {**asdict(replace(bench_config, artifacts={})), "quick": quick},
        "environment": environment(),
        "skipped_engines": skipped,
        "results": [asdict(result) for result in results],
        "max_batch": [asdict(limit) for limit in limits],
    }
    click.echo(text_table(results, limits))
    if out is not None:
        files = {"bench.json": json_bytes(report),
                 "bench.md": markdown(report, results, limits).encode(),
                 "bench.png": plot(results, f"{model_name} {bench_config.image_size}px")}
        write_directory(out, files, force)
        click.echo(f"wrote {out}/bench.json, bench.md, bench.png", err=True)


def search_max_batches(config: BenchConfig, results: list[Result]) -> list[MaxBatch]:
    """Max batch under --memory-limit for every engine x policy (none without a limit)."""
    if config.memory_limit is None:
        return []
    limits = []
    for engine in config.engines:
        for policy in config.policies:
            known = {r.batch: r.runs[0] for r in results
                     if (r.engine, r.policy) == (engine, policy)}
            click.echo(f"max batch under {config.memory_limit / MiB:.0f} MiB: {engine} "
                       f"{policy}", err=True)
            limits.append(max_batch(config, engine, policy, known))
    return limits


def environment() -> dict[str, object]:
    import os

    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_default_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _ratio(result: Result, group: str) -> str:
    ratios = getattr(result, group)
    return f"{ratios['images_per_s']:.2f}x" if ratios else "-"


def result_rows(results: list[Result]) -> list[list[str]]:
    header = ["engine", "policy", "batch", "KV slots", "KV MiB", "step ms", "images/s",
              "peak RSS MiB", "vs full", "vs baseline", "KV vs full"]
    cuda = any(r.peak_cuda_bytes is not None for r in results)
    rows = [header + (["peak CUDA MiB"] if cuda else [])]
    for r in results:
        kv_share = f"{r.vs_full['kv_bytes']:.3f}" if r.vs_full else "-"
        row = [r.engine, r.policy, str(r.batch), str(r.kv_capacity), f"{r.kv_bytes / MiB:.1f}",
               f"{r.step_ms:.1f}", f"{r.images_per_s:.4g}", f"{r.peak_rss_bytes / MiB:.0f}",
               _ratio(r, "vs_full"), _ratio(r, "vs_baseline"), kv_share]
        rows.append(row + ([f"{(r.peak_cuda_bytes or 0) / MiB:.0f}"] if cuda else []))
    return rows


def limit_rows(limits: list[MaxBatch]) -> list[list[str]]:
    def mib(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value / MiB:.{digits}f}"

    rows = [["engine", "policy", "limit MiB", "fixed MiB", "MiB/image", "predicted", "tried",
             "max batch", "peak RSS MiB", "images/s", "note"]]
    for m in limits:
        tried = " ".join(f"{b}:{mib(rss)}" for b, rss in m.tried) or "-"
        rows.append([m.engine, m.policy, mib(m.memory_limit), mib(m.fixed_bytes),
                     mib(m.per_image_bytes, 1), str(m.predicted), tried, str(m.batch),
                     mib(m.peak_rss_bytes),
                     "-" if m.images_per_s is None else f"{m.images_per_s:.4g}", m.note or "-"])
    return rows


def aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def text_table(results: list[Result], limits: list[MaxBatch]) -> str:
    text = aligned(result_rows(results))
    return text + ("\n\nmax batch under the memory limit\n" + aligned(limit_rows(limits))
                   if limits else "")


def markdown(report: dict, results: list[Result], limits: list[MaxBatch]) -> str:
    config = report["config"]
    parts = [
        f"# linear-export bench: {config['model']} {config['image_size']} px",
        "",
        f"{config['dtype']} on {config['device']} ({config['threads'] or 'default'} threads), "
        f"CFG {config['cfg_scale']}, top-k {config['top_k']}, {config['repeats']} repeat(s), "
        "medians; every run a fresh "
        f"process. `{ORIGINAL}` is LlamaGen's own generate() (from --llamagen-src), "
        f"`{BASELINE}` the project's stand-in for it. Ratios are images/s against `full` on "
        "the same engine and against that reference.",
        "",
        markdown_table(result_rows(results)),
    ]
    if limits:
        parts += ["", "## Max batch under the memory limit", "",
                  "Peak RSS fitted as fixed + per image x batch on two batches; the predicted "
                  "batch is then run, and a run above the limit refits through it and tries a "
                  "smaller batch (`tried` lists batch:peak MiB).", "",
                  markdown_table(limit_rows(limits))]
    if report["skipped_engines"]:
        parts += ["", *(f"- skipped {name}: {why}"
                        for name, why in report["skipped_engines"].items())]
    parts += ["", "```json", json.dumps(report["environment"], indent=2), "```", ""]
    return "\n".join(parts)


def plot(results: list[Result], title: str) -> bytes:
    """Images/s and memory (KV, peak RSS) per configuration, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib import pyplot

    labels = [f"{r.engine}\n{r.policy}\nb{r.batch}" for r in results]
    positions = range(len(results))
    figure, (speed, memory) = pyplot.subplots(2, 1, figsize=(max(6, len(results) * 1.1), 7))
    speed.bar(positions, [r.images_per_s for r in results], color="tab:blue")
    speed.set_ylabel("images/s")
    speed.set_title(title)
    width = 0.4
    memory.bar([p - width / 2 for p in positions], [r.kv_bytes / MiB for r in results], width,
               label="KV cache")
    memory.bar([p + width / 2 for p in positions], [r.peak_rss_bytes / MiB for r in results],
               width, label="peak RSS")
    memory.set_ylabel("MiB")
    memory.legend()
    for axes in (speed, memory):
        axes.set_xticks(list(positions), labels, fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    return buffer.getvalue()
