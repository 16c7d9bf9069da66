"""Per-step decode latency, ORT vs PyTorch, at several cache capacities; export time and size.

Run: .venv/bin/python scripts/measure_ort.py [--repeats 20] [--xl] [--json out.json]

Every capacity gets its own artifact (C is static in the graph), built by `linear-export build`
in a child process so its export time and peak memory are its own. The latency loop then
alternates all (engine, capacity) configurations step by step, so a noisy machine slows them
all alike, and reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from linear_export.engines.cache import CacheShape, KVCache
from linear_export.engines.ort import OrtEngine
from linear_export.engines.torch import TorchEngine
from linear_export.export.artifact import rehash
from linear_export.export.split_cache import split_cache_inputs
from linear_export.models import SequenceLayout, get_config, load_gpt
from linear_export.runtime.policy_spec import make_policy as build_policy

# `linear-export` in a child that reports its own peak memory on exit.
CLI = [sys.executable, "-c",
       "import resource, sys\n"
       "from linear_export.cli import main\n"
       "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
       "finally:\n    print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
       " file=sys.stderr)"]


def build(model: str, image_size: int, policy: str, budget: str, out: Path, rows: int,
          timeout: float) -> dict:
    """`linear-export build` in a child: wall time, export time, size, peak RSS."""
    command = [*CLI, "build", "--model", model, "--image-size", str(image_size),
               "--random-weights", "--policy", policy, "--budget", budget,
               "--max-batch", str(max(rows, 2)), "--out", str(out), "--force"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    peak = [int(line.split()[1]) for line in done.stderr.splitlines()
            if line.startswith("PEAK_RSS_KIB")]
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"wall_s": round(wall, 1), "export_s": manifest["build"]["export_seconds"],
            "bytes": size, "capacity": manifest["capacity"],
            "peak_rss_gib": round(peak[0] / 2**20, 2) if peak else None}


def derive_per_layer(stacked: Path, out: Path, n_layer: int) -> None:
    """The per-layer-input form of a built artifact, without a second export.

    `build --cache-inputs per-layer` runs the same rewrite right after its export; here the
    weights file is hard-linked and only the small graph file is rewritten.
    """
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for name in ("step.onnx", "manifest.json"):
        shutil.copy2(stacked / name, out / name)
    os.link(stacked / "step.onnx.data", out / "step.onnx.data")
    split_cache_inputs(out / "step.onnx", n_layer)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["build"]["cache_inputs"] = "per-layer"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rehash(out)


def session_seconds(path: Path) -> tuple[float, float]:
    """OrtEngine start-up: first (optimizes and caches the graph), then from the cache."""
    shutil.rmtree(path / ".ort", ignore_errors=True)
    started = time.perf_counter()
    OrtEngine(path)
    first = time.perf_counter() - started
    started = time.perf_counter()
    OrtEngine(path)
    return first, time.perf_counter() - started


def latency(configs: dict[str, tuple], rows: int, repeats: int, warmup: int = 3) -> dict:
    """Median ms of one decode step (T = 1) per configuration, configurations interleaved."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(warmup + repeats):
        for name, (engine, cache, ids, positions) in configs.items():
            started = time.perf_counter()
            engine.step(ids, positions, cache)  # the decode step, what every step runs
            elapsed = time.perf_counter() - started
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def decode_inputs(engine, capacity: int, rows: int):
    """A cache filled to one slot short of capacity (the graph's work does not depend on it)."""
    config = engine.config
    cache = KVCache(CacheShape(config.n_layer, rows, config.kv_heads, capacity, config.head_dim),
                    engine.dtype)
    cache.key.normal_()
    cache.value.normal_()
    cache.cache_len = capacity - 1
    ids = torch.randint(0, config.vocab_size, (rows, 1))
    positions = torch.full((rows, 1), capacity - 1)
    return cache, ids, positions


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="GPT-B")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="images; CFG doubles the rows")
    parser.add_argument("--budgets", default="full,1/4,1/6",
                        help="comma-separated capacities to time; 'none' skips the timing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--xl", action="store_true", help="also export GPT-XL 384 px")
    parser.add_argument("--xl-timeout", type=float, default=900.0)
    parser.add_argument("--work", type=Path, default=None, help="where artifacts go")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of both engines [default: each one's own]")
    parser.add_argument("--reuse", action="store_true",
                        help="keep artifacts already in --work instead of rebuilding them")
    return parser.parse_args()


def build_all(args: argparse.Namespace, layout: SequenceLayout, n_layer: int, work: Path,
              rows: int, report: dict) -> dict:
    """Each budget's artifact (stacked, and per-layer derived from it) and its capacity."""
    artifacts = {}
    for spec in [] if args.budgets == "none" else args.budgets.split(","):
        policy = build_policy(layout, "full" if spec == "full" else "linear", spec)
        out = work / f"{args.model}-{policy.capacity}"
        if args.reuse and (out / "manifest.json").is_file():
            manifest = json.loads((out / "manifest.json").read_text())
            result = {"reused": True, "export_s": manifest["build"]["export_seconds"],
                      "capacity": manifest["capacity"],
                      "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}
        else:
            print(f"building {args.model} capacity {policy.capacity} ({spec}) ...", flush=True)
            result = build(args.model, args.image_size, policy.name, spec, out, rows, 1800)
        result["session_first_s"], result["session_cached_s"] = (
            session_seconds(out) if "error" not in result else (None, None))
        report["builds"][spec] = result
        print(f"  {result}", flush=True)
        if "error" in result:
            continue
        per_layer = work / f"{args.model}-{policy.capacity}-per-layer"
        derive_per_layer(out, per_layer, n_layer)
        artifacts[spec] = (out, per_layer, policy.capacity)
    return artifacts


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = 2 * args.batch
    work = args.work or Path(tempfile.mkdtemp(prefix="measure-ort."))
    work.mkdir(parents=True, exist_ok=True)
    layout_config = get_config(args.model)
    layout = SequenceLayout.for_image(layout_config, args.image_size)
    report: dict = {"model": args.model, "image_size": args.image_size, "rows": rows,
                    "torch_threads": torch.get_num_threads(),
                    "ort_threads": args.threads or os.cpu_count(), "builds": {},
                    "latency_ms": {}}

    artifacts = build_all(args, layout, layout_config.n_layer, work, rows, report)
    model = load_gpt(args.model, args.image_size, None) if artifacts else None
    configs = {}
    for spec, (stacked, per_layer, capacity) in artifacts.items():
        engines = {"ort stacked": OrtEngine(stacked, threads=args.threads),
                   "ort per-layer": OrtEngine(per_layer, threads=args.threads),
                   "torch": TorchEngine(model)}
        for label, engine in engines.items():
            configs[f"{label} {spec} (C={capacity})"] = (
                engine, *decode_inputs(engine, capacity, rows))
    print(f"timing {len(configs)} configurations x {args.repeats} interleaved steps, "
          f"{rows} rows ...", flush=True)
    report["latency_ms"] = latency(configs, rows, args.repeats) if configs else {}
    for name, value in report["latency_ms"].items():
        print(f"  {name:<34} {value:8.1f} ms/step", flush=True)
    del configs, model

    if args.xl:
        out = work / "GPT-XL-384-full"
        print("building GPT-XL 384 px, full capacity ...", flush=True)
        report["builds"]["GPT-XL 384 full"] = build("GPT-XL", 384, "full", "1/4", out, rows,
                                                    args.xl_timeout)
        print(f"  {report['builds']['GPT-XL 384 full']}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
