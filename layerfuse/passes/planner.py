"""What every planner shares: where its data comes from, and the search over candidates.

Planners (merge, prune, fuse) all calibrate on one split and choose between candidate
rewrites on another. :class:`DataSettings` is that part of every request (the same
``--data``/``--calib-tokens``/``--valid-tokens`` options on every command);
:func:`search_best` is the one loop that rewrites the model once per candidate in memory,
scores it on validation data and keeps the best.
"""

from __future__ import annotations

__all__ = ["DataSettings", "search_best"]

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import onnx_ir as ir

from layerfuse.data.batches import InputBatch, make_batches
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import Reporter

T = TypeVar("T")
SPLIT_TOKENS = {"calib": "calib_tokens", "valid": "valid_tokens"}


@dataclass
class DataSettings:
    """Calibration and validation inputs of a planner, and where it runs them."""

    data: str = "fortunes"
    calib_tokens: int = 4096
    valid_tokens: int = 4096
    seq_len: int = 128
    batch_size: int = 8
    provider: str = "auto"

    def batches(self, model_path: str | os.PathLike, split: str) -> list[InputBatch]:
        """About ``calib_tokens`` or ``valid_tokens`` tokens of ``split`` for the model."""
        return make_batches(
            model_path,
            self.data,
            split,
            tokens=getattr(self, SPLIT_TOKENS[split]),
            seq_len=self.seq_len,
            batch_size=self.batch_size,
        )

    def scorer(self, model_path: str | os.PathLike) -> CandidateScorer:
        """A scorer of in-memory rewrites on the validation split."""
        valid = self.batches(model_path, "valid")
        return CandidateScorer(model_path, valid, data=self.data, provider=self.provider)

    def to_json(self) -> dict:
        return {"data": self.data, "seq_len": self.seq_len}


def search_best(
    candidates: Sequence[T],
    rewrite: Callable[[T], ir.Model],
    scorer: CandidateScorer,
    reporter: Reporter,
    description: str,
) -> tuple[T, list[float]]:
    """Score ``rewrite(candidate)`` for every candidate; the lowest score wins.

    Returns the winner and every candidate's score in order, for the plan's record.
    """
    scores = [
        scorer(rewrite(candidate))
        for candidate in reporter.track(candidates, len(candidates), description)
    ]
    best = min(range(len(candidates)), key=scores.__getitem__)
    return candidates[best], scores
