"""Figures and summaries that go with plans and analyses (fusion, CKA).

The CLI and the benchmark scripts draw the same pictures from the same records: a fusion
plan's block-dependency heatmaps and attention-importance chart, and the CKA heatmaps of
``layerfuse analyze``.
"""

from __future__ import annotations

__all__ = ["cka_figures", "cka_summary", "fusion_figures"]

from pathlib import Path

import numpy as np

from layerfuse.reports.plots import bar_chart, heatmap

_CKA_TITLES = {"ff": "FF sublayer outputs", "attention": "attention outputs"}


def fusion_figures(plan, stem: Path) -> list[Path]:
    """Dependency heatmaps (one per measured run) and the attention-importance chart of a
    :class:`~layerfuse.passes.fuse.FusePlan`, written as ``STEM.dependency-A-B.png`` and
    ``STEM.attention.png``."""
    written = []
    for entry in plan.dependency:
        first, last = entry["run"]
        written.append(
            heatmap(
                np.asarray(entry["matrix"]),
                list(range(first, last + 1)),
                f"Dependency of FFN j (col) on FFN i (row), blocks {first}-{last}",
                stem.with_name(f"{stem.name}.dependency-{first}-{last}.png"),
                colorbar="mean cosine distance",
                vmax=None,
            )
        )
    if plan.attention_scores:
        labels = [str(i) for i, s in enumerate(plan.attention_scores) if s is not None]
        values = [s for s in plan.attention_scores if s is not None]
        written.append(
            bar_chart(
                labels,
                {"without this attention": values},
                f"Validation {plan.metric} with attention removed (by first block)",
                plan.metric,
                stem.with_name(f"{stem.name}.attention.png"),
                reference_line=plan.baseline_score,
            )
        )
    return written


def cka_figures(result: dict, out_dir: Path) -> list[Path]:
    """One heatmap per non-empty CKA matrix of a :func:`sublayer_cka` result."""
    written = []
    for kind, title in _CKA_TITLES.items():
        matrix = np.asarray(result[kind]["cka"])
        if matrix.size:
            written.append(
                heatmap(
                    matrix,
                    result[kind]["blocks"],
                    f"Linear CKA of {title}",
                    out_dir / f"cka_{kind}.png",
                    colorbar="CKA",
                )
            )
    return written


def cka_summary(result: dict) -> list[str]:
    """Mean CKA of adjacent blocks and of all pairs, per kind: the paper's claim in numbers."""
    lines = []
    for kind in _CKA_TITLES:
        matrix = np.asarray(result[kind]["cka"])
        if matrix.size > 1:
            adjacent = np.diag(matrix, k=1)
            pairs = matrix[np.triu_indices(len(matrix), 1)]
            lines.append(
                f"{kind}: mean CKA of adjacent blocks {adjacent.mean():.3f}, "
                f"of all pairs {pairs.mean():.3f}"
            )
    return lines


def kv_similarity_figure(plan, stem: Path) -> list[Path]:
    """The heatmap of how alike the layers' keys and values are (``STEM.kv-similarity.png``),
    when the share-kv planner measured it."""
    if not plan.similarity:
        return []
    layers = list(range(len(plan.similarity)))
    return [
        heatmap(
            np.asarray(plan.similarity),
            layers,
            "Keys and values: mean cosine similarity between layers",
            stem.with_name(f"{stem.name}.kv-similarity.png"),
            colorbar="mean cosine similarity",
            vmin=None,
        )
    ]
