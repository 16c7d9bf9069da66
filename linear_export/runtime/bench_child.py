"""One benchmark run in a fresh process: `python -m linear_export.runtime.bench_child JOB_JSON`.

It loads only what the job needs, warms up for a few steps, runs one timed generation and
prints a `Measurement` as JSON on its last stdout line.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from ..errors import UserError
from .bench import (
    ARTIFACT_ENGINES,
    BASELINE,
    CLASSES,
    ORIGINAL,
    BenchConfig,
    Job,
    Measurement,
    artifact_key,
    engine_parts,
)
from .policy_spec import parse_policy
from .sampling import SamplingConfig


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM).

    Not ru_maxrss: Linux carries it across exec, so a child started by vfork/exec would
    report its parent's peak. ru_maxrss only where /proc is missing.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class WarmupDone(Exception):
    """Raised by a step past the warm-up's step limit, to end the warm-up generation."""


def stop_after(step: Callable, limit: int | None, starts: list[float]) -> Callable:
    """`step` that records when each call starts and raises WarmupDone after `limit` calls."""

    def timed(*args, **kwargs):
        if limit is not None and len(starts) >= limit:
            raise WarmupDone
        starts.append(time.perf_counter())
        return step(*args, **kwargs)

    return timed


class TimedEngine:
    """An engine whose step() is wrapped by `stop_after` and whose line-end score calls are
    timed (`sync` first waits for a GPU's queued work); everything else is delegated."""

    def __init__(self, engine, limit: int | None = None, sync: Callable[[], None] = lambda: None):
        self.engine, self.starts, self.score_seconds, self.sync = engine, [], [], sync
        self.step = stop_after(engine.step, limit, self.starts)

    def score_line(self, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        mass = self.engine.score_line(*args, **kwargs)
        self.sync()
        self.score_seconds.append(time.perf_counter() - start)
        return mass

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def make_engine(job: Job):
    """The engine (or baseline loop) a child measures; ort loads its artifact, not torch weights."""
    from ..engines import make_engine as make_named_engine
    from .bench import load_bench_model

    config = job.config
    if job.engine in ARTIFACT_ENGINES:
        name, artifact = engine_parts(job.engine)[0], config.artifacts[artifact_key(
            job.engine, job.policy)]
        if name == "ort" and config.threads:
            from ..engines.ort import OrtEngine  # make_engine takes no thread count

            return OrtEngine(artifact, config.device, threads=config.threads)
        return make_named_engine(name, artifact=artifact, device=config.device)
    model = load_bench_model(config)
    if job.engine == BASELINE:
        from .baseline import BaselineLoop

        return BaselineLoop(model)
    if job.engine == ORIGINAL:
        from .original import OriginalLoop

        return OriginalLoop(model, config.llamagen_src, config.model)
    return make_named_engine(job.engine, model, cuda_graph=config.cuda_graph)


def run_baseline(loop, classes: list[int], sampling: SamplingConfig, config: BenchConfig):
    step = loop.step
    loop.step = stop_after(step, config.warmup_steps, [])
    try:
        loop.generate(classes, sampling, seed=config.seed)
    except WarmupDone:
        pass
    loop.step = step
    gc.collect()
    result = loop.generate(classes, sampling, seed=config.seed)
    return result.seconds, result.step_seconds, result.kv_capacity, result.kv_bytes


def run_original(loop, classes: list[int], sampling: SamplingConfig, config: BenchConfig):
    """LlamaGen's generate(): a short warm-up generation, then the timed one (its loop has no
    per-step hook, so a step is the mean)."""
    loop.generate(classes, sampling, config.seed, tokens=config.warmup_steps + 1)
    gc.collect()
    _, seconds = loop.generate(classes, sampling, config.seed)
    rows = len(classes) * (2 if sampling.uses_cfg else 1)
    cache = loop.original.layers[0].attention.kv_cache.k_cache
    nbytes = 2 * len(loop.original.layers) * cache.numel() * cache.element_size()
    return seconds, [seconds / loop.tokens], cache.shape[2], nbytes * rows // cache.shape[0]


def run_engine(engine, policy, classes: list[int], sampling: SamplingConfig,
               config: BenchConfig):
    from .generate import generate

    try:
        generate(TimedEngine(engine, config.warmup_steps), classes, policy, sampling,
                 seed=config.seed)
    except WarmupDone:
        pass
    gc.collect()
    sync = torch.cuda.synchronize if config.device.startswith("cuda") else lambda: None
    timed = TimedEngine(engine, sync=sync)
    stats = generate(timed, classes, policy, sampling, seed=config.seed).stats
    # Decode step i lasts from its start to the next one's: engine, append, sampling, eviction.
    steps = [b - a for a, b in zip(timed.starts[1:], timed.starts[2:], strict=False)]
    score = statistics.median(timed.score_seconds) if timed.score_seconds else None
    return stats.seconds_generate, steps, stats.kv_capacity, stats.kv_bytes, score


def run_job(job: Job) -> Measurement:
    """The child's work: warm up for a few steps, then one timed generation."""
    config = job.config
    if config.threads:
        torch.set_num_threads(config.threads)
    engine = make_engine(job)
    sampling = SamplingConfig(cfg_scale=config.cfg_scale, top_k=config.top_k)
    if config.family == "llamagen":
        num_classes = engine.config.num_classes
        classes = [CLASSES[i % len(CLASSES)] % num_classes for i in range(job.batch)]
    else:  # seeded token prompts or caption features of two lengths
        classes = engine.family.example_conditions(job.batch, config.seed)
    score, line_steps = None, 0
    if job.engine == BASELINE:
        seconds, steps, capacity, nbytes = run_baseline(engine, classes, sampling, config)
    elif job.engine == ORIGINAL:
        seconds, steps, capacity, nbytes = run_original(engine, classes, sampling, config)
    else:
        layout = engine.family.token_layout(engine.layout)
        policy = parse_policy(job.policy, layout, model_config=engine.config)
        seconds, steps, capacity, nbytes, score = run_engine(engine, policy, classes, sampling,
                                                             config)
        line_steps = layout.width
    cuda = torch.cuda.max_memory_allocated() if config.device.startswith("cuda") else None
    step_ms = 1e3 * statistics.median(steps or [seconds])
    return Measurement(seconds, job.batch, step_ms, capacity, nbytes, peak_rss_bytes(), cuda,
                       None if score is None else 1e3 * score,
                       None if score is None else 1e3 * score / (line_steps * step_ms))


def job_from_json(text: str) -> Job:
    data = json.loads(text)
    config = data.pop("config")
    for name in ("engines", "policies", "batch_sizes", "fit_batches"):
        config[name] = tuple(config[name])
    return Job(config=BenchConfig(**config), **data)


if __name__ == "__main__":
    try:
        measurement = run_job(job_from_json(sys.argv[1]))
    except UserError as error:  # the parent passes the sentence on
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(asdict(measurement)))
