"""Linear CKA between the outputs of every pair of FF sublayers and of attention sublayers.

The merging paper's motivation is that FF sublayers form regions of similar outputs while
attention sublayers do not; these matrices check that claim on the user's own model.

CKA is computed as *minibatch* CKA with the unbiased HSIC estimator (Nguyen, Raghu &
Kornblith, 2021): for each chunk of tokens, linear kernels ``K = X X^T`` of every layer
are compared, and the HSIC sums are accumulated across chunks. Memory depends on the chunk
size, not on the model width or the number of tokens, and the estimate is invariant to
permuting (or rotating) neurons, as CKA should be.
"""

from __future__ import annotations

__all__ = ["MinibatchCKA", "hsic_unbiased", "sublayer_cka"]

import os
from itertools import combinations_with_replacement

import numpy as np

from layerfuse.data.batches import InputBatch
from layerfuse.errors import DetectionError
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import ActivationTap, stream_rows

CHUNK_TOKENS = 512


def _zero_diagonal(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kernel = kernel.copy()
    np.fill_diagonal(kernel, 0.0)
    return kernel, kernel.sum(axis=0)


def _hsic(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    (k, ones_k), (m, ones_m) = a, b
    n = k.shape[0]
    trace = float(np.vdot(k, m))
    middle = float(ones_k.sum() * ones_m.sum()) / ((n - 1) * (n - 2))
    cross = 2.0 * float(ones_k @ ones_m) / (n - 2)
    return (trace + middle - cross) / (n * (n - 3))


def hsic_unbiased(k: np.ndarray, m: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al., 2012) of two ``n x n`` kernels, ``n > 3``."""
    return _hsic(_zero_diagonal(k), _zero_diagonal(m))


class MinibatchCKA:
    """Accumulates HSIC between every pair of named representations, chunk by chunk."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.hsic = np.zeros((len(names), len(names)), np.float64)
        self.chunks = 0

    def update(self, rows: dict[str, np.ndarray]) -> None:
        """``rows[name]`` is ``[tokens, width]``; all names see the same tokens."""
        tokens = rows[self.names[0]].shape[0]
        for start in range(0, tokens, CHUNK_TOKENS):
            stop = min(start + CHUNK_TOKENS, tokens)
            if stop - start < 4:
                continue
            kernels = []
            for name in self.names:
                x = rows[name][start:stop].astype(np.float64)
                kernels.append(_zero_diagonal(x @ x.T))
            for i, j in combinations_with_replacement(range(len(self.names)), 2):
                value = _hsic(kernels[i], kernels[j])
                self.hsic[i, j] += value
                self.hsic[j, i] = self.hsic[i, j]
            self.chunks += 1

    def matrix(self) -> np.ndarray:
        diagonal = np.sqrt(np.maximum(np.diag(self.hsic), 1e-30))
        return self.hsic / np.outer(diagonal, diagonal)


def sublayer_cka(
    model_path: str | os.PathLike,
    batches: list[InputBatch],
    *,
    provider: str = "auto",
    reporter: Reporter = SILENT,
) -> dict:
    """CKA matrices of FF outputs and of attention outputs, by block index."""
    structure = detect_structure(load_model(model_path))
    ff_names = [block.ff.output.name for block in structure.blocks]
    attention_blocks = [b for b in structure.blocks if b.attention is not None]
    attention_names = [b.attention.output.name for b in attention_blocks]
    if len(ff_names) < 2:
        raise DetectionError("CKA needs at least two blocks")
    tap = ActivationTap(
        model_path, ff_names + attention_names, provider=provider, model_outputs=False
    )
    ff_cka, attention_cka = MinibatchCKA(ff_names), MinibatchCKA(attention_names or ff_names)
    seen = 0
    for rows in stream_rows(tap, batches, total=len(batches), reporter=reporter, description="CKA"):
        ff_cka.update(rows)
        if attention_names:
            attention_cka.update(rows)
        seen += rows[ff_names[0]].shape[0]
    return {
        "tokens": seen,
        "ff": {"blocks": [b.index for b in structure.blocks], "cka": ff_cka.matrix().tolist()},
        "attention": {
            "blocks": [b.index for b in attention_blocks],
            "cka": attention_cka.matrix().tolist() if attention_names else [],
        },
    }
