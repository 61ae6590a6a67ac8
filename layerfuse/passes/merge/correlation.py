"""Neuron correlations between FF sublayers, accumulated batch by batch, and alignment.

Cross-correlation needs only running sums: per-neuron sums and squares, and for each pair of
FFs the cross-product ``X_a^T X_b``. Those are updated from each calibration batch and the
activations are dropped, so the token count is bounded by time, not memory. Memory is
``width^2`` doubles per pair; :func:`pair_groups` splits the pairs into groups that fit a
budget, each group costing one pass over the calibration data.
"""

from __future__ import annotations

__all__ = ["Alignment", "PairStatistics", "align", "pair_groups"]

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


class PairStatistics:
    """Running moments of the hidden neurons of several FFs and of chosen FF pairs."""

    def __init__(self, widths: dict[int, int], pairs: Iterable[tuple[int, int]]) -> None:
        self.count = 0
        self.sums = {i: np.zeros(w, np.float64) for i, w in widths.items()}
        self.squares = {i: np.zeros(w, np.float64) for i, w in widths.items()}
        self.cross = {(a, b): np.zeros((widths[a], widths[b]), np.float64) for a, b in pairs}

    def update(self, rows: dict[int, np.ndarray]) -> None:
        """Add one batch: ``rows[i]`` is ``[tokens, width]`` for FF ``i`` (same tokens for all).

        Rows of any float dtype are widened to float32 first: an fp16 graph's activations
        multiplied in fp16 would overflow the cross products past 65504.
        """
        rows = {i: x.astype(np.float32, copy=False) for i, x in rows.items()}
        counts = {x.shape[0] for x in rows.values()}
        if len(counts) != 1:
            raise ValueError(f"FFs saw different token counts in one batch: {sorted(counts)}")
        self.count += counts.pop()
        for i, x in rows.items():
            self.sums[i] += x.sum(axis=0, dtype=np.float64)
            self.squares[i] += np.square(x, dtype=np.float64).sum(axis=0)
        for a, b in self.cross:
            # float32 products per batch (a few thousand rows) are exact enough and twice as
            # fast; the running sums across batches are kept in float64.
            self.cross[(a, b)] += rows[a].T @ rows[b]

    def correlation(self, a: int, b: int) -> np.ndarray:
        """Pearson correlation between every neuron of FF ``a`` and every neuron of FF ``b``."""
        n = max(self.count, 1)
        mean_a, mean_b = self.sums[a] / n, self.sums[b] / n
        std_a = np.sqrt(np.maximum(self.squares[a] / n - mean_a**2, 0.0))
        std_b = np.sqrt(np.maximum(self.squares[b] / n - mean_b**2, 0.0))
        covariance = self.cross[(a, b)] / n - np.outer(mean_a, mean_b)
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = covariance / np.outer(std_a, std_b)
        # A neuron that never varies (dead on this data) correlates with nothing.
        return np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class Alignment:
    """How FF ``other``'s neurons map onto the anchor's, and how well they match."""

    permutation: np.ndarray
    matched_correlation: float
    identity_correlation: float


def align(correlation: np.ndarray) -> Alignment:
    """Permutation maximizing total correlation to the anchor (rows are anchor neurons).

    Neuron ``j`` of the permuted FF is neuron ``permutation[j]`` of the original, the one
    matched to anchor neuron ``j``.
    """
    rows, cols = linear_sum_assignment(correlation, maximize=True)
    permutation = np.empty(correlation.shape[0], dtype=np.int64)
    permutation[rows] = cols
    return Alignment(
        permutation=permutation,
        matched_correlation=float(correlation[rows, cols].mean()),
        identity_correlation=float(np.diag(correlation).mean()),
    )


def pair_groups(
    pairs: list[tuple[int, int]], widths: dict[int, int], budget_bytes: int
) -> list[list[tuple[int, int]]]:
    """Split ``pairs`` into groups whose cross-product accumulators fit ``budget_bytes``."""
    groups: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    used = 0
    for a, b in pairs:
        size = widths[a] * widths[b] * 8
        if current and used + size > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append((a, b))
        used += size
    if current:
        groups.append(current)
    return groups
