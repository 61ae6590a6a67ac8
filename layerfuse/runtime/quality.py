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
    "OutputFidelity",
    "output_fidelity",
    "perplexity",
    "ridge_accuracy",
    "row_cosine",
    "run_outputs",
    "sentence_embeddings",
]

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from layerfuse.errors import DataError
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import adapt_feeds, token_rows


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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(session, batches: list, reporter: Reporter = SILENT) -> float:
    """exp(mean negative log-likelihood of each next token) over all real positions."""
    total_nll, total_tokens = 0.0, 0
    for batch, logits in run_outputs(session, batches, reporter, len(batches), "perplexity"):
        ids = batch.feeds["input_ids"]
        mask = batch.mask if batch.mask is not None else np.ones_like(ids)
        log_probs = _log_softmax(logits[:, :-1].astype(np.float64))
        targets = ids[:, 1:]
        picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
        total_nll -= float(picked[valid].sum())
        total_tokens += int(valid.sum())
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


def output_fidelity(reference, candidate, batches: list, reporter: Reporter = SILENT):
    """Compare two sessions' first outputs position by position (real tokens only)."""
    max_diff, abs_sum, cos_sum, rows = 0.0, 0.0, 0.0, 0
    name_a, name_b = reference.get_outputs()[0].name, candidate.get_outputs()[0].name
    for batch in reporter.track(batches, len(batches), "comparing outputs"):
        a = token_rows(reference.run([name_a], adapt_feeds(reference, batch.feeds))[0], batch.mask)
        b = token_rows(candidate.run([name_b], adapt_feeds(candidate, batch.feeds))[0], batch.mask)
        if a.shape != b.shape:
            raise DataError(
                f"the reference's output is {list(a.shape)} per batch, this graph's "
                f"{list(b.shape)}: compare graphs of the same model"
            )
        diff = np.abs(a - b)
        max_diff = max(max_diff, float(diff.max()))
        abs_sum += float(diff.mean(axis=1).sum())
        cos_sum += float(row_cosine(a, b).sum())
        rows += a.shape[0]
    return OutputFidelity(max_diff, abs_sum / max(rows, 1), cos_sum / max(rows, 1))
