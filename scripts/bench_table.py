"""One table from several `linear-export bench --out DIR` runs: python bench_table.py DIR..."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from linear_export.api.bench import aligned, result_rows
from linear_export.runtime.bench import Measurement, Result


def load_results(directory: Path) -> tuple[str, list[Result]]:
    """The run's label (model, size, dtype, device) and its results."""
    report = json.loads((directory / "bench.json").read_text())
    config = report["config"]
    label = (f"{config['model']} {config['image_size']}px {config['dtype']}"
             + (" cuda-graph" if config.get("cuda_graph") else ""))
    results = [Result(**{**data, "runs": [Measurement(**run) for run in data["runs"]]})
               for data in report["results"]]
    return label, results


def table(directories: list[Path]) -> str:
    """Every run's rows under one header, with a leading model column."""
    rows: list[list[str]] = []
    for directory in directories:
        if not (directory / "bench.json").is_file():
            continue  # that run failed or timed out; the caller has said so
        label, results = load_results(directory)
        own = result_rows(results)
        if not rows:
            rows.append(["model", *own[0]])
        width = len(rows[0]) - 1
        rows += [[label, *(row + ["-"] * (width - len(row)))[:width]] for row in own[1:]]
    return aligned(rows) if rows else "no benchmark results"


if __name__ == "__main__":
    print(table([Path(arg) for arg in sys.argv[1:]]))
