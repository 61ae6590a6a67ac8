"""Figures: heatmaps of layer-by-layer matrices (CKA, block dependency) and bar charts."""

from __future__ import annotations

__all__ = ["bar_chart", "heatmap", "pyplot", "save_figure"]

import os
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    return path


def heatmap(
    matrix: np.ndarray,
    labels: list,
    title: str,
    path: str | os.PathLike,
    *,
    colorbar: str = "",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> Path:
    plt = pyplot()
    size = max(4.0, min(10.0, 0.28 * len(labels) + 2.5))
    figure, axis = plt.subplots(figsize=(size + 1.0, size))
    image = axis.imshow(np.asarray(matrix, dtype=float), cmap="viridis", vmin=vmin, vmax=vmax)
    step = max(1, len(labels) // 15)
    ticks = list(range(0, len(labels), step))
    axis.set_xticks(ticks, [str(labels[i]) for i in ticks])
    axis.set_yticks(ticks, [str(labels[i]) for i in ticks])
    axis.set_xlabel("block")
    axis.set_ylabel("block")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label=colorbar, fraction=0.046, pad=0.04)
    return save_figure(figure, path)


def bar_chart(
    groups: list[str],
    series: dict[str, list[float]],
    title: str,
    ylabel: str,
    path: str | os.PathLike,
    *,
    reference_line: float | None = None,
) -> Path:
    """Grouped bars: one group per x label, one bar per series."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(series))), 4.2))
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        positions = np.arange(len(groups)) + (index - (len(series) - 1) / 2) * width
        axis.bar(positions, values, width, label=name)
    if reference_line is not None:
        axis.axhline(reference_line, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(np.arange(len(groups)), groups, rotation=15, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        axis.legend()
    return save_figure(figure, path)
