"""Figures: layer x head heatmaps and simple curves (matplotlib, no display needed).

matplotlib loads on the first figure, not with the plugins that may draw one, so
commands that draw nothing start quickly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scores_matrix(
    rows: Sequence[dict[str, Any]], layers: int | None = None, heads: int | None = None
) -> np.ndarray:
    """[layers, heads] array from rows with layer/head/value (missing heads: NaN)."""
    if not rows:
        return np.zeros((0, 0))
    layers = layers or 1 + max(r["layer"] for r in rows)
    heads = heads or 1 + max(r["head"] for r in rows)
    matrix = np.full((layers, heads), np.nan)
    for row in rows:
        matrix[row["layer"], row["head"]] = row["value"]
    return matrix


def head_heatmap(matrix: np.ndarray, title: str, label: str = "score", annotate_top: int = 5):
    """A layer (rows) x head (columns) heatmap; the top heads are outlined."""
    layers, heads = matrix.shape
    height = max(3.0, min(12.0, 0.28 * layers + 1.5))
    width = max(4.0, min(14.0, 0.5 * heads + 2.5))
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(
        matrix, aspect="auto", cmap="viridis", origin="upper", interpolation="nearest"
    )
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title)
    axes.set_xticks(range(heads))
    step = 1 if layers <= 32 else max(1, layers // 16)
    axes.set_yticks(range(0, layers, step))
    figure.colorbar(image, ax=axes, label=label)
    boxed = top_cells(matrix, annotate_top)
    for layer, head in boxed:
        axes.add_patch(
            plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5)
        )
    if boxed:
        outline = plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="red", lw=1.5)
        axes.legend(
            [outline],
            [f"top {len(boxed)} heads"],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12 if layers > 8 else -0.2),
            frameon=False,
            fontsize=8,
        )
    figure.tight_layout()
    return figure


def top_cells(matrix: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The (layer, head) cells of the k highest finite scores, leaving out ties at
    the cut (which of them would be arbitrary) and cells at the map's minimum
    (an all-zero map has no top heads)."""
    finite = np.isfinite(matrix)
    if k <= 0 or not finite.any():
        return []
    values = matrix[finite]
    ranked = np.sort(values)[::-1]
    floor = ranked[k] if k < ranked.size else -np.inf
    chosen = finite & (matrix > floor) & (matrix > values.min())
    cells = [(int(layer), int(head)) for layer, head in zip(*np.nonzero(chosen), strict=True)]
    return sorted(cells, key=lambda cell: -matrix[cell])


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str
):
    """Curves sharing axes: {label: (x, y)}."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, (x, y) in series.items():
        axes.plot(x, y, marker="o", label=label)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
