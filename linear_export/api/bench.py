"""Benchmark engines x policies (images/s, step latency, KV bytes, peak memory), each run in a
fresh process, alternating, medians; the report as a table, markdown and a plot."""

from __future__ import annotations

import io
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import UserError
from ..models import SequenceLayout, get_config
from ..models.families import HF_FAMILIES, check_family, load_step_model
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

Log = Callable[[str], None]

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


@dataclass(frozen=True)
class BenchOptions:
    """The bench command's options; None takes the default (or --quick's)."""

    model: str | None = None
    checkpoint: str | None = None
    family: str = "llamagen"
    max_prompt_tokens: int = 128
    image_size: int | None = None
    engines: str | None = None  # "torch,ort"
    policies: str | None = None  # "full,linear:1/4"
    batch_sizes: str | None = None  # "8"
    cfg_scale: float = 4.0
    top_k: int = 1000
    repeats: int | None = None
    warmup_steps: int | None = None
    threads: int | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    memory_limit: str | None = None  # "6GiB": also search the max batch under it
    fit_batches: str | None = None
    seed: int = 0
    artifacts_dir: str | None = None
    cuda_graph: bool = False
    llamagen_src: str | None = None  # a LlamaGen checkout: its own generate() is the reference
    quick: bool = False

    def setting(self, name: str) -> object:
        """An option's value: as given, else the --quick or the normal default."""
        given = getattr(self, name)
        return given if given is not None else (QUICK if self.quick else DEFAULTS)[name]


@dataclass
class BenchReport:
    config: BenchConfig
    results: list[Result]
    limits: list[MaxBatch]
    report: dict  # bench.json

    def text(self) -> str:
        return text_table(self.results, self.limits)

    def files(self) -> dict[str, bytes]:
        """bench.json, bench.md and bench.png."""
        title = f"{self.config.model} {self.config.image_size}px"
        return {"bench.json": json.dumps(self.report, indent=2).encode() + b"\n",
                "bench.md": markdown(self.report, self.results, self.limits).encode(),
                "bench.png": plot(self.results, title)}


def bench(options: BenchOptions | None = None, *, progress: bool = False,
          log: Log = lambda line: None, **option_fields: object) -> BenchReport:
    """Run the benchmark `options` (or their fields as keywords) describe."""
    options = replace(options or BenchOptions(), **option_fields)
    config, skipped = bench_config(options, log)
    with prepare_artifacts(config, log=log) as paths:
        config = replace(config, artifacts=paths)
        try:
            results = measure(config, progress=progress, log=log)
            limits = search_max_batches(config, results, log)
        except RuntimeError as error:
            raise UserError(f"A benchmark run failed: {error}") from None
    report = {
        "schema_version": 1,
        "config": {**asdict(replace(config, artifacts={})), "quick": options.quick},
        "environment": environment(),
        "skipped_engines": skipped,
        "results": [asdict(result) for result in results],
        "max_batch": [asdict(limit) for limit in limits],
    }
    return BenchReport(config, results, limits, report)


def _layout(options: BenchOptions, model_name: str, image_size: int,
            log: Log) -> SequenceLayout:
    """The token layout the policies are sized on (another family's: from its weights)."""
    if options.family == "llamagen":
        return SequenceLayout.for_image(get_config(model_name), image_size)
    log(f"loading the {options.family} model to size its policies")
    model = load_step_model(options.family, checkpoint=options.checkpoint,
                            model_name=model_name, image_size=image_size, dtype=options.dtype,
                            seed=options.seed, max_prompt_tokens=options.max_prompt_tokens)
    return model.family.token_layout(model.layout)


def _check_runs(options: BenchOptions) -> None:
    """Repeats, threads, warmup, device and the LlamaGen checkout, before any work."""
    if options.setting("repeats") < 1:
        raise UserError(f"--repeats {options.repeats} must be at least 1.")
    if options.threads is not None and options.threads < 1:
        raise UserError(f"--threads {options.threads} must be at least 1.")
    if options.setting("warmup_steps") < 0:
        raise UserError(f"--warmup-steps {options.warmup_steps} must be 0 or more.")
    device = options.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but torch sees no CUDA device; use --device cpu.")
    if options.cuda_graph and not device.startswith("cuda"):
        raise UserError("--cuda-graph needs --device cuda (CUDA graphs exist only on NVIDIA "
                        "GPUs); drop --cuda-graph or pass --device cuda.")
    if options.llamagen_src is not None:
        if options.family != "llamagen":
            raise UserError("--llamagen-src times LlamaGen's class-to-image generate(); it "
                            f"does not run --family {options.family}.")
        import_original(options.llamagen_src)  # a clear error now, not in every child


def _engines(options: BenchOptions, log: Log) -> tuple[list[str], dict[str, str]]:
    chosen, skipped = available_engines(options.setting("engines"), options.device)
    if options.family == "llamagen-t2i" and "tensorrt" in chosen:  # its prefill takes features
        chosen.remove("tensorrt")
        skipped["tensorrt"] = ("the TensorRT engine does not run llamagen-t2i's caption-features "
                               "prefill yet")
        if not chosen:
            raise UserError("--family llamagen-t2i runs on the torch and ort engines; add one "
                            "of them to --engines.")
    for name, reason in skipped.items():
        log(f"skipping engine {name}: {reason}")
    return chosen, skipped


def bench_config(options: BenchOptions, log: Log) -> tuple[BenchConfig, dict[str, str]]:
    """The validated BenchConfig, and the engines skipped here with why."""
    model_name, image_size = options.setting("model"), options.setting("image_size")
    check_family(options.family, options.checkpoint)
    layout = _layout(options, model_name, image_size, log)
    if options.family == "llamagen":
        image_size = layout.height * get_config(model_name).downsample
    specs = [s.strip() for s in options.setting("policies").split(",") if s.strip()]
    if "full" not in specs:
        specs.insert(0, "full")  # every ratio needs it
    for spec in specs:
        parse_policy(spec, layout)  # fail on a bad spec before any work
    _check_runs(options)
    fit = parse_ints(options.setting("fit_batches"), "--fit-batches")
    if len(set(fit)) != 2:
        raise UserError(f"--fit-batches '{options.fit_batches}' must be two different batch "
                        "sizes such as 1,4.")
    chosen, skipped = _engines(options, log)
    config = BenchConfig(
        model=model_name if options.family not in HF_FAMILIES else Path(options.checkpoint).name,
        checkpoint=options.checkpoint, family=options.family,
        max_prompt_tokens=options.max_prompt_tokens, image_size=image_size,
        engines=tuple(chosen), policies=tuple(specs),
        batch_sizes=parse_ints(options.setting("batch_sizes"), "--batch-sizes"),
        cfg_scale=options.cfg_scale, top_k=options.top_k, repeats=options.setting("repeats"),
        dtype=options.dtype, device=options.device, seed=options.seed,
        warmup_steps=options.setting("warmup_steps"), threads=options.setting("threads"),
        memory_limit=None if options.memory_limit is None else parse_size(options.memory_limit),
        fit_batches=tuple(sorted(fit)), artifacts_dir=options.artifacts_dir,
        cuda_graph=options.cuda_graph,
        llamagen_src=(None if options.llamagen_src is None
                      else str(Path(options.llamagen_src).resolve())),
    )
    return config, skipped


def search_max_batches(config: BenchConfig, results: list[Result], log: Log) -> list[MaxBatch]:
    """Max batch under --memory-limit for every engine x policy (none without a limit)."""
    if config.memory_limit is None:
        return []
    limits = []
    for engine in config.engines:
        for policy in config.policies:
            known = {r.batch: r.runs[0] for r in results
                     if (r.engine, r.policy) == (engine, policy)}
            log(f"max batch under {config.memory_limit / MiB:.0f} MiB: {engine} {policy}")
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
    scored = any(r.score_ms is not None for r in results)
    rows = [header + (["peak CUDA MiB"] if cuda else [])
            + (["score ms", "score/line"] if scored else [])]
    for r in results:
        kv_share = f"{r.vs_full['kv_bytes']:.3f}" if r.vs_full else "-"
        row = [r.engine, r.policy, str(r.batch), str(r.kv_capacity), f"{r.kv_bytes / MiB:.1f}",
               f"{r.step_ms:.1f}", f"{r.images_per_s:.4g}", f"{r.peak_rss_bytes / MiB:.0f}",
               _ratio(r, "vs_full"), _ratio(r, "vs_baseline"), kv_share]
        row += [f"{(r.peak_cuda_bytes or 0) / MiB:.0f}"] if cuda else []
        if scored:  # LineAR's line-end score call, and its share of a line's decode steps
            row += (["-", "-"] if r.score_ms is None
                    else [f"{r.score_ms:.1f}", f"{100 * r.score_share:.1f}%"])
        rows.append(row)
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
        "medians (the reference: its fastest run); every run a fresh "
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
