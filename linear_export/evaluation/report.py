"""Evaluation outputs: the markdown table and the plots (metric vs budget, samples, kept cells)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..runtime.decode import image_grid, png_bytes  # noqa: E402
from .sweep import EvalResult  # noqa: E402

METRICS = (
    ("nll_delta_pct", "NLL vs full (%)"),
    ("agreement", "token agreement with full"),
    ("accuracy", "class accuracy"),
    ("frechet", "Fréchet distance (classifier features)"),
)


def markdown_table(result: EvalResult) -> str:
    def cell(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| policy | budget | tokens | capacity | NLL | ΔNLL % | agreement | accuracy "
        "| FD ± noise |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        fd = "–" if row.frechet is None else f"{row.frechet:.2f} ± {row.frechet_noise:.2f}"
        lines.append(
            f"| {row.policy} | {row.budget} | {row.budget_tokens} | {row.capacity} | "
            f"{cell(row.nll, 4)} | {row.nll_delta_pct:+.2f} ± {row.nll_delta_se_pct:.2f} | "
            f"{cell(row.agreement)} | "
            f"{cell(row.accuracy)} | {fd} |"
        )
    if result.real_frechet_floor is not None:
        lines.append(f"\nFD between two halves of the real images (sample-size floor): "
                     f"{result.real_frechet_floor:.2f}")
    lines.append("ΔNLL ± its standard error, paired over the held-out images.")
    return "\n".join(lines) + "\n"


def figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def metrics_plot(result: EvalResult) -> bytes:
    """One panel per metric, budget share on x, one line per policy, full as a dashed line.

    ΔNLL carries its paired standard error as error bars.
    """
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), layout="constrained")
    full = next(row for row in result.rows if row.policy == "full")
    for axis, (key, title) in zip(axes.flat, METRICS, strict=True):
        if getattr(full, key) is None:
            axis.set_visible(False)
            continue
        for policy in dict.fromkeys(row.policy for row in result.rows if row.policy != "full"):
            # Budgets may be given as shares, token counts or lines: plot the share.
            points = sorted((row.budget_tokens / full.budget_tokens, getattr(row, key),
                             row.nll_delta_se_pct if key == "nll_delta_pct" else 0.0)
                            for row in result.rows if row.policy == policy)
            shares, values, errors = zip(*points, strict=True)
            axis.errorbar(shares, values, yerr=errors, marker="o", capsize=3, label=policy)
        axis.axhline(getattr(full, key), color="black", linestyle="--", label="full")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("budget (share of the image)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes.flat[0].legend()
    return figure_bytes(figure)


def sample_grids(result: EvalResult) -> dict[str, bytes]:
    """Per policy: one row of samples per budget (one sample per class)."""
    grids: dict[str, list[np.ndarray]] = {}
    for key, pictures in result.samples.items():
        grids.setdefault(key.split()[0], []).append(pictures)
    return {
        f"samples_{policy}.png": png_bytes(image_grid(np.concatenate(rows), len(rows[0])))
        for policy, rows in grids.items()
    }


def kept_cells_plot(result: EvalResult) -> bytes | None:
    """Which grid cells LineAR keeps, per layer (columns) at a few line ends (rows)."""
    if not result.kept_cells:
        return None
    stages = list(result.kept_cells)
    layers = result.kept_cells[stages[0]].shape[0]
    figure, axes = plt.subplots(len(stages), layers, figsize=(1.6 * layers, 1.7 * len(stages)),
                                squeeze=False)
    for row, stage in enumerate(stages):
        for layer in range(layers):
            axis = axes[row, layer]
            axis.imshow(result.kept_cells[stage][layer], vmin=0, vmax=1, cmap="viridis")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"layer {layer}", fontsize=8)
            if layer == 0:
                axis.set_ylabel(f"after {stage}", fontsize=8)
    figure.suptitle("LineAR 1/4: share of heads keeping each cell")
    return figure_bytes(figure)
