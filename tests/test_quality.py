"""Quality measures on numbers whose answer is known: ridge accuracy, row cosine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from layerfuse.model.manifest import require_manifest
from layerfuse.runtime.evaluate import topic_accuracy
from layerfuse.runtime.quality import ridge_accuracy, row_cosine
from layerfuse.runtime.session import create_session

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "merge_quality.json"


def _clusters(labels: np.ndarray, spread: float, seed: int) -> np.ndarray:
    """Points around one centre per class: far apart (separable) or overlapping."""
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 16) * 10
    return centres[labels] + spread * rng.standard_normal((len(labels), 16))


def test_ridge_accuracy_is_one_on_separable_classes_and_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    train_x, test_x = _clusters(train_y, 0.5, 1), _clusters(test_y, 0.5, 2)
    assert ridge_accuracy(train_x, train_y, test_x, test_y) == 1.0
    shuffled = rng.permutation(train_y)
    assert abs(ridge_accuracy(train_x, shuffled, test_x, test_y) - 0.25) < 0.1


def test_row_cosine_of_scaled_and_opposite_rows():
    rows = np.random.default_rng(0).standard_normal((5, 8))
    np.testing.assert_allclose(row_cosine(rows, 3 * rows), np.ones(5), atol=1e-12)
    np.testing.assert_allclose(row_cosine(rows, -rows), -np.ones(5), atol=1e-12)


@pytest.mark.slow
def test_minilm_topic_accuracy_reproduces_the_committed_result(real):
    path = real.model("minilm-l6")
    rows = json.loads(RESULTS.read_text())["rows"]
    committed = next(
        r["value"] for r in rows if r["model"] == "minilm-l6" and r["method"] == "original"
    )
    measured = topic_accuracy(
        create_session(path, provider="cpu"), path.parent / require_manifest(path).tokenizer
    )
    assert committed > 0.5
    assert measured == pytest.approx(committed, abs=0.005)
