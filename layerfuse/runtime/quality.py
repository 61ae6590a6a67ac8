"""Quality of a graph on real data: perplexity, topic accuracy, fidelity to the original.

- Causal LMs: perplexity of next-token prediction on packed held-out text.
- Encoders: sentence embeddings (mean pooling over real tokens, L2-normalized, as
  sentence-transformers does for MiniLM), scored by a closed-form ridge classifier fitted on
  the train split *of the same graph* and tested on the test split: a compressed encoder
  deployed behind a cheap retrained head is judged the way it would be used.
- Any model: fidelity of outputs to the original graph on the same inputs (task-free).
"""

from __future__ import annotations

__all__ = [
    "CHUNK_BYTES",
    "OutputFidelity",
    "next_token_nll",
    "output_fidelity",
    "perplexity",
    "ridge_accuracy",
    "row_chunks",
    "row_cosine",
    "run_outputs",
    "sentence_embeddings",
]

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from layerfuse.errors import DataError
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import adapt_feeds, real_positions


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(norms, 1e-12)


def run_outputs(
    session, batches: Iterable, reporter: Reporter = SILENT, total=None, what="running"
):
    """Yield (batch, first output) for each batch."""
    name = session.get_outputs()[0].name
    for batch in reporter.track(batches, total, what):
        yield batch, session.run([name], adapt_feeds(session, batch.feeds))[0]


# Float64 work one chunk of rows may take. A batch of [batch x seq x vocab] logits is read a
# few rows at a time: on a 262k vocabulary a float64 log-softmax of a whole batch of 16 x 128
# positions is 4.3 GB, and three such temporaries made `fuse` peak at 12.5 GB.
CHUNK_BYTES = 64 * 2**20


def row_chunks(rows: int, width: int, chunk_bytes: int | None = None) -> Iterator[slice]:
    """Consecutive slices of ``rows`` whose float64 ``[rows, width]`` fits ``chunk_bytes``
    (default :data:`CHUNK_BYTES`, read at call time; at least one row each)."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    step = max(1, budget // max(8 * width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def next_token_nll(
    logits: np.ndarray,
    ids: np.ndarray,
    mask: np.ndarray | None,
    chunk_bytes: int | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood of each real next token of one batch, and their count.

    Only the positions that count are gathered, a chunk of rows at a time, so the extra
    memory is ``chunk_bytes`` whatever the batch and vocabulary; each row's log-softmax is
    exact (float64, max-shifted) in any chunking.
    """
    mask = np.ones_like(ids) if mask is None else mask
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    rows, positions = np.nonzero(valid)
    targets = ids[:, 1:][rows, positions]
    total = 0.0
    for part in row_chunks(len(rows), logits.shape[-1], chunk_bytes):
        chunk = logits[rows[part], positions[part]].astype(np.float64)
        chunk -= chunk.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(chunk).sum(axis=1))
        picked = chunk[np.arange(len(chunk)), targets[part]]
        total += float((log_norm - picked).sum())
    return total, len(rows)


def _batch_nll(session, name: str, batch) -> tuple[float, int]:
    """One batch's NLL; its logits are freed on return, before the next batch runs."""
    logits = session.run([name], adapt_feeds(session, batch.feeds))[0]
    return next_token_nll(logits, batch.feeds["input_ids"], batch.mask)


def perplexity(session, batches: list, reporter: Reporter = SILENT) -> float:
    """exp(mean negative log-likelihood of each next token) over all real positions.

    Memory: one batch's logits (as onnxruntime returns them) plus one chunk of rows.
    """
    name = session.get_outputs()[0].name
    total_nll, total_tokens = 0.0, 0
    for batch in reporter.track(batches, len(batches), "perplexity"):
        nll, count = _batch_nll(session, name, batch)
        total_nll += nll
        total_tokens += count
    return math.exp(total_nll / max(total_tokens, 1))


def sentence_embeddings(session, batches: list, reporter: Reporter = SILENT) -> np.ndarray:
    """Mean-pooled, L2-normalized embeddings, one row per text."""
    rows = []
    for batch, hidden in run_outputs(session, batches, reporter, len(batches), "embedding"):
        mask = batch.mask.astype(np.float32)[..., None]
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        rows.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
    return np.concatenate(rows, axis=0)


def ridge_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    alpha: float = 1e-2,
) -> float:
    """Accuracy of a one-vs-rest ridge classifier (closed form, deterministic)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    targets = np.eye(classes)[train_y] * 2 - 1
    x = np.hstack([train_x, np.ones((len(train_x), 1))]).astype(np.float64)
    weights = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ targets)
    scores = np.hstack([test_x, np.ones((len(test_x), 1))]) @ weights
    return float((scores.argmax(axis=1) == test_y).mean())


@dataclass
class OutputFidelity:
    """How far a variant's outputs are from the original's on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    mean_cosine: float

    def to_json(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "mean_cosine": self.mean_cosine,
        }


def _first_output(session, batch) -> np.ndarray:
    return session.run([session.get_outputs()[0].name], adapt_feeds(session, batch.feeds))[0]


def _batch_fidelity(a: np.ndarray, b: np.ndarray, mask) -> tuple[float, float, float, int]:
    """(max |a - b|, summed row mean |a - b|, summed row cosine, rows) over real positions,
    a chunk of rows at a time, so no copy of two batches of logits is ever made. float32
    as the graphs compute: a refit is kept only if it beats averaging by more than float64
    noise on outputs that are equal in float32."""
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if rows_a.shape != rows_b.shape:
        raise DataError(
            f"the reference's output is {list(a.shape)} per batch, this graph's "
            f"{list(b.shape)}: compare graphs of the same model"
        )
    keep = real_positions(rows_a, mask)
    max_diff, abs_sum, cos_sum = 0.0, 0.0, 0.0
    for part in row_chunks(len(keep), rows_a.shape[1]):
        x = rows_a[keep[part]].astype(np.float32)
        y = rows_b[keep[part]].astype(np.float32)
        cos_sum += float(row_cosine(x, y).sum())
        x -= y
        np.abs(x, out=x)
        max_diff = max(max_diff, float(x.max(initial=0.0)))
        abs_sum += float(x.mean(axis=1).sum())
    return max_diff, abs_sum, cos_sum, len(keep)


def output_fidelity(reference, candidate, batches: list, reporter: Reporter = SILENT):
    """Compare two sessions' first outputs position by position (real tokens only)."""
    max_diff, abs_sum, cos_sum, rows = 0.0, 0.0, 0.0, 0
    for batch in reporter.track(batches, len(batches), "comparing outputs"):
        batch_max, batch_abs, batch_cos, count = _batch_fidelity(
            _first_output(reference, batch), _first_output(candidate, batch), batch.mask
        )
        max_diff = max(max_diff, batch_max)
        abs_sum, cos_sum, rows = abs_sum + batch_abs, cos_sum + batch_cos, rows + count
    return OutputFidelity(max_diff, abs_sum / max(rows, 1), cos_sum / max(rows, 1))
