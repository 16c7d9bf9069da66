"""`linear-export bench`: images/s, latency and memory of engines x policies."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import api
from ..api.bench import DEFAULTS, BenchOptions
from ..models import DTYPES, GPT_CONFIGS
from ..models.families import FAMILIES
from ..outputs import check_writable, write_directory


@click.command(name="bench")
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
              help="Comma-separated engines: torch, ort, tensorrt, and ort-int8, ort-int4, "
                   "ort-w8a8 (ort on an artifact with those weights) [default: torch,ort].")
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
def bench_command(model_name, checkpoint, family, max_prompt_tokens, image_size, engines,
                  policies, batch_sizes, cfg_scale, top_k, repeats, warmup_steps, threads, dtype,
                  device, memory_limit, fit_batches, seed, out, artifacts_dir, cuda_graph,
                  llamagen_src, quick, force) -> None:
    """Measure images/s, step latency, KV bytes and peak memory of engines x policies.

    Every run is a fresh process, configurations alternate within each repeat, and the
    reported numbers are medians, but for the reference loop, which is its fastest run.
    Ratios are against `full` on the same engine and against the reference loop: LlamaGen's
    own generate() with --llamagen-src (`llamagen`), else the project's stand-in for it
    (`baseline`).

    Example: linear-export bench --engines torch,ort --policies full,linear:1/4 --out bench/
    """
    if out is not None:
        check_writable(out, force)
    options = BenchOptions(model_name, checkpoint, family, max_prompt_tokens, image_size,
                           engines, policies, batch_sizes, cfg_scale, top_k, repeats,
                           warmup_steps, threads, dtype, device, memory_limit, fit_batches,
                           seed, artifacts_dir, cuda_graph, llamagen_src, quick)
    report = api.bench(options, progress=sys.stderr.isatty(),
                   log=lambda line: click.echo(line, err=True))
    click.echo(report.text())
    if out is not None:
        write_directory(out, report.files(), force)
        click.echo(f"wrote {out}/bench.json, bench.md, bench.png", err=True)
