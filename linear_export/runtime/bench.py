"""Benchmark measurements: each configuration runs in a fresh child process, round-robin.

A fresh process per run is what makes peak RSS a per-configuration number. The parent only
plans and collects; the child (`runtime.bench_child`) loads the model, warms up, runs one
generation and prints a `Measurement` as JSON on its last line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from tqdm.auto import tqdm

from ..engines import ENGINES
from ..errors import UserError
from ..export.quantize import WEIGHT_FORMATS

BASELINE = "baseline"  # the project's stand-in for LlamaGen's loop (runtime.baseline)
ORIGINAL = "llamagen"  # LlamaGen's own generate() from --llamagen-src (runtime.original)
REFERENCES = (BASELINE, ORIGINAL)  # loops every ratio is taken against, not engines
CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20,
              "mb": 10**6, "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40,
              "tb": 10**12}
MAX_CONFIRM_TRIES = 3
# ort-int8 / ort-int4: the ort engine on an artifact built with those weights (build --weights)
QUANTIZED_ORT = tuple(f"ort-{name}" for name in WEIGHT_FORMATS if name != "fp32")
KNOWN_ENGINES = (*ENGINES, *QUANTIZED_ORT)
ARTIFACT_ENGINES = tuple(name for name in KNOWN_ENGINES if name != "torch")  # run artifacts


def engine_parts(engine: str) -> tuple[str, str]:
    """'ort-int8' -> ('ort', 'int8'): the engine and its artifact's weight format."""
    name, _, weights = engine.partition("-")
    return name, weights or "fp32"


def artifact_key(engine: str, spec: str) -> str:
    """Where a job finds its artifact in BenchConfig.artifacts: per policy and weights."""
    return f"{spec}@{engine_parts(engine)[1]}"


def parse_size(text: str) -> int:
    """'8GiB' -> 8 * 2**30 bytes; KB/MB/GB are decimal, KiB/MiB/GiB and bare K/M/G binary."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", str(text).lower())
    value = float(match[1]) * SIZE_UNITS[match[2]] if match and match[2] in SIZE_UNITS else 0
    if value < 1:
        raise UserError(f"--memory-limit {text!r} is not a size; give a number with a unit such "
                        "as 8GiB, 8GB or 512MiB.")
    return int(value)


@dataclass(frozen=True)
class BenchConfig:
    """What one `linear-export bench` run measures."""

    model: str = "GPT-B"
    checkpoint: str | None = None  # None: seeded random weights; janus/lumina: a HF directory
    family: str = "llamagen"
    max_prompt_tokens: int = 128  # janus/lumina: the prefix capacity
    image_size: int = 256
    engines: tuple[str, ...] = ("torch",)
    policies: tuple[str, ...] = ("full", "linear:1/4", "linear:1/6")
    batch_sizes: tuple[int, ...] = (8,)
    cfg_scale: float = 4.0
    top_k: int = 1000
    repeats: int = 3
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    warmup_steps: int = 3
    threads: int | None = None  # torch and ort intra-op threads per child; None: their default
    memory_limit: int | None = None  # bytes; None: no max-batch search
    fit_batches: tuple[int, int] = (1, 4)
    artifacts_dir: str | None = None  # keep and reuse built artifacts here
    cuda_graph: bool = False  # torch engine: replay decode steps from a CUDA graph
    llamagen_src: str | None = None  # a LlamaGen checkout: its generate() is the reference
    artifacts: dict[str, str] = field(default_factory=dict)  # ort: policy spec -> artifact dir


@dataclass(frozen=True)
class Job:
    """One generation in one child process."""

    engine: str
    policy: str
    batch: int
    config: BenchConfig

    @property
    def key(self) -> tuple[str, str, int]:
        return self.engine, self.policy, self.batch


@dataclass
class Measurement:
    """What one child measured."""

    seconds: float
    images: int
    step_ms: float  # median over the generation's decode steps, sampling and eviction included
    kv_capacity: int
    kv_bytes: int
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    score_ms: float | None = None  # median line-end score call (LineAR); None: no call
    score_share: float | None = None  # score_ms / a line's decode steps (width x step_ms)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass
class Result:
    """One (engine, policy, batch): medians over repeats, and ratios against the references.

    A reference loop (LlamaGen's generate(), or the stand-in) is its fastest repeat instead:
    the peer in its best run. LlamaGen's fp32 loop on this project's CPU runs at two speeds
    from one process to the next (GPT-B 256 px, 8 images: 127-155 or 266-330 ms a step, the
    difference all in its weight matmuls; docs/speed.md), so a median could make every ratio
    twice too kind.
    """

    engine: str
    policy: str
    batch: int
    images_per_s: float
    step_ms: float
    kv_capacity: int
    kv_bytes: int
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    runs: list[Measurement]
    score_ms: float | None = None
    score_share: float | None = None
    vs_full: dict[str, float] | None = None  # value / value of `full` on the same engine
    vs_baseline: dict[str, float] | None = None  # value / value of the baseline loop

    RATIO_FIELDS: ClassVar[tuple[str, ...]] = (
        "images_per_s", "step_ms", "kv_bytes", "peak_rss_bytes")

    @classmethod
    def from_runs(cls, job: Job, runs: list[Measurement]) -> Result:
        def median(name: str, of: list[Measurement] = runs):
            values = [getattr(run, name) for run in of]
            return None if None in values else statistics.median(values)

        # The speed of a reference is its fastest run's (the median of that one run).
        timed = [max(runs, key=lambda run: run.images_per_s)] if job.engine in REFERENCES \
            else runs
        return cls(job.engine, job.policy, job.batch, median("images_per_s", timed),
                   median("step_ms", timed),
                   runs[0].kv_capacity, runs[0].kv_bytes, int(median("peak_rss_bytes")),
                   median("peak_cuda_bytes"), runs, median("score_ms", timed),
                   median("score_share", timed))

    def ratios(self, reference: Result) -> dict[str, float]:
        return {name: getattr(self, name) / getattr(reference, name) for name in self.RATIO_FIELDS}


@dataclass
class MaxBatch:
    """The largest batch whose peak RSS stays under the limit, from a linear fit and a check."""

    engine: str
    policy: str
    memory_limit: int
    fit: list[tuple[int, int]]  # (batch, measured peak RSS) the line was fitted to
    fixed_bytes: float
    per_image_bytes: float
    predicted: int | None  # None: the fit is unusable (RSS did not grow with the batch)
    tried: list[tuple[int, int]] = field(default_factory=list)  # (batch, peak RSS) confirmations
    batch: int | None = None  # the largest batch measured under the limit
    peak_rss_bytes: int | None = None
    images_per_s: float | None = None
    step_ms: float | None = None
    note: str = ""  # why no batch was confirmed


def ratio_table(results: list[Result]) -> None:
    """Fill each result's ratios against `full` on its engine and the baseline, same batch."""
    index = {(r.engine, r.policy, r.batch): r for r in results}
    for result in results:
        full = index.get((result.engine, "full", result.batch))
        baseline = index.get((ORIGINAL, "full", result.batch)) or index.get(
            (BASELINE, "full", result.batch))
        result.vs_full = (result.ratios(full) if full and result.engine not in REFERENCES
                          else None)
        result.vs_baseline = result.ratios(baseline) if baseline else None


def load_bench_model(config: BenchConfig, device: str | None = None):
    """The step model a bench measures (any family), on `device` or the config's."""
    from ..models.families import load_step_model

    return load_step_model(config.family, checkpoint=config.checkpoint, model_name=config.model,
                           image_size=config.image_size, dtype=config.dtype,
                           device=device or config.device, seed=config.seed,
                           max_prompt_tokens=config.max_prompt_tokens)


def plan(config: BenchConfig) -> list[Job]:
    """The configurations of one repeat: the reference loop, then every engine x policy.

    The reference is LlamaGen's own generate() with --llamagen-src, else the project's
    stand-in for it; both are c2i loops, so other families run without one.
    """
    jobs = []
    reference = ORIGINAL if config.llamagen_src else BASELINE
    for batch in config.batch_sizes:
        if config.family == "llamagen":
            jobs.append(Job(reference, "full", batch, config))
        jobs += [Job(engine, policy, batch, config)
                 for engine in config.engines for policy in config.policies]
    return jobs


def run_child(job: Job) -> Measurement:
    """Measure `job` in a fresh interpreter; a child that fails raises with its last words."""
    payload = json.dumps(asdict(job))
    done = subprocess.run([sys.executable, "-m", "linear_export.runtime.bench_child", payload],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode == 2 and last.startswith("error: "):
        raise UserError(last.removeprefix("error: "))
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else "failed"
        tail = done.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"{job.engine}/{job.policy}/batch {job.batch} {reason}: "
                           + " | ".join(tail))
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def measure(config: BenchConfig, runner: Callable[[Job], Measurement] = run_child,
            progress: bool = True,
            log: Callable[[str], None] = lambda line: None) -> list[Result]:
    """Every configuration `repeats` times, alternating: repeat r runs them all, rotated by r.

    Each finished run is one line, through the bar (`progress`) or else `log`: a bench can
    take an hour, and a log file shows no bar.
    """
    jobs = plan(config)
    runs: dict[tuple, list[Measurement]] = {job.key: [] for job in jobs}
    total = len(jobs) * config.repeats
    with tqdm(total=total, unit="run", disable=not progress) as bar:
        for repeat in range(config.repeats):
            shift = repeat % len(jobs)  # no configuration always runs first (warm caches, turbo)
            for index, job in enumerate(jobs[shift:] + jobs[:shift], repeat * len(jobs) + 1):
                bar.set_description(f"{job.engine} {job.policy} b{job.batch}")
                run = runner(job)
                runs[job.key].append(run)
                bar.update(1)
                line = (f"run {index}/{total}: {job.engine} {job.policy} batch {job.batch}: "
                        f"{run.seconds:.1f} s, {run.images_per_s:.4g} images/s, "
                        f"{run.step_ms:.1f} ms/step")
                (bar.write if progress else log)(line)
    results = [Result.from_runs(job, runs[job.key]) for job in jobs]
    ratio_table(results)
    return results


def fit_line(points: Iterable[tuple[int, int]]) -> tuple[float, float]:
    """The line RSS(b) = fixed + per_image * b through the smallest and largest batch."""
    (b1, r1), (b2, r2) = sorted(points)[0], sorted(points)[-1]
    if b1 == b2:
        raise ValueError("two different batch sizes are needed to fit the memory model")
    per_image = (r2 - r1) / (b2 - b1)
    return r1 - per_image * b1, per_image


def predict_batch(fixed: float, per_image: float, limit: int) -> int:
    if per_image <= 0:
        return 0
    return max(0, math.floor((limit - fixed) / per_image))


def max_batch(config: BenchConfig, engine: str, policy: str, known: dict[int, Measurement],
              runner: Callable[[Job], Measurement] = run_child) -> MaxBatch:
    """Fit RSS(b) on two batches, predict the largest under the limit, then run it to confirm.

    A confirmation above the limit refits through it and the nearest smaller measured batch
    and tries again (secant steps), at most MAX_CONFIRM_TRIES runs.
    """
    limit = config.memory_limit
    assert limit is not None
    measured = dict(known)
    for batch in config.fit_batches:
        if batch not in measured:
            measured[batch] = runner(Job(engine, policy, batch, config))
    points = [(b, measured[b].peak_rss_bytes) for b in config.fit_batches]
    fixed, per_image = fit_line(points)
    result = MaxBatch(engine, policy, limit, points, fixed, per_image, None)
    if per_image <= 0:
        result.note = ("peak RSS did not grow with the batch (noise exceeds the per-image "
                       "memory); fit on batches further apart with --fit-batches")
        return result
    result.predicted = guess = predict_batch(fixed, per_image, limit)
    while guess > 0 and len(result.tried) < MAX_CONFIRM_TRIES:
        run = measured.get(guess) or runner(Job(engine, policy, guess, config))
        measured[guess] = run
        result.tried.append((guess, run.peak_rss_bytes))
        if run.peak_rss_bytes <= limit:
            result.batch, result.peak_rss_bytes = guess, run.peak_rss_bytes
            result.images_per_s, result.step_ms = run.images_per_s, run.step_ms
            return result
        below = [b for b in measured if b < guess]
        next_guess = guess - 1
        if below:  # secant step through the nearest smaller measured batch
            f, p = fit_line([(max(below), measured[max(below)].peak_rss_bytes),
                             (guess, run.peak_rss_bytes)])
            next_guess = min(next_guess, predict_batch(f, p, limit))
        guess = next_guess
    result.note = ("the fixed memory alone exceeds the limit" if result.predicted == 0 else
                   f"no batch measured under the limit in {len(result.tried)} tries")
    return result


def available_engines(spec: str, device: str) -> tuple[list[str], dict[str, str]]:
    """The requested engines that can run here, and why each of the others is skipped."""

    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN_ENGINES]
    if unknown or not names:
        raise UserError(f"Unknown engine '{(unknown or [spec])[0]}' in --engines; choose from "
                        f"{', '.join(KNOWN_ENGINES)}.")
    chosen, skipped = [], {}
    for name in dict.fromkeys(names):
        base = engine_parts(name)[0]
        if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
            skipped[name] = ("the tensorrt package is not installed (its libraries come only "
                             "from NVIDIA's package index)")
        elif name == "tensorrt" and not device.startswith("cuda"):
            skipped[name] = "TensorRT runs on NVIDIA GPUs only; pass --device cuda"
        elif base not in ENGINES:
            skipped[name] = f"this linear-export has no {name} engine (it has {', '.join(ENGINES)})"
        elif base == "ort" and importlib.util.find_spec("onnxruntime") is None:
            skipped[name] = "onnxruntime is not installed; pip install onnxruntime(-gpu)"
        else:
            chosen.append(name)
    if not chosen:
        raise UserError(f"None of --engines '{spec}' can run here; add torch.")
    return chosen, skipped
