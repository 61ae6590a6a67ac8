"""Score rewritten models in memory on validation data, to choose between candidates.

Sliding-window merging, pruning and attention removal all try many in-memory rewrites of one
model and keep the best. :class:`CandidateScorer` holds the validation batches and the
reference session once and scores each candidate without writing it to disk. Lower is better:
perplexity for causal LMs, ``1 - cosine`` of outputs against the original otherwise.
"""

from __future__ import annotations

__all__ = ["CandidateScorer"]

import os
from pathlib import Path

import onnx_ir as ir

from layerfuse.data.batches import InputBatch
from layerfuse.model.manifest import require_manifest
from layerfuse.runtime.quality import output_fidelity, perplexity
from layerfuse.runtime.session import create_session, session_for_ir


class CandidateScorer:
    """Scores rewrites of the model at ``model_path`` on fixed validation ``batches``."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        batches: list[InputBatch],
        *,
        data: str = "fortunes",
        provider: str = "auto",
    ) -> None:
        self.model_path = Path(model_path)
        self.provider = provider
        self.batches = batches
        task = require_manifest(self.model_path).task
        self.metric = "perplexity" if task == "causal-lm" and data != "random" else "output_cosine"
        self._reference = None

    def __call__(self, model: ir.Model) -> float:
        """The score of an in-memory rewrite of *this* model (its untouched weights are read
        from this model's folder)."""
        return self._score(session_for_ir(model, self.model_path.parent, provider=self.provider))

    def score_file(self, path: str | os.PathLike) -> float:
        """The score of a model written elsewhere (a recovered finalist): its own folder's
        external data, on the same batches."""
        return self._score(create_session(path, provider=self.provider))

    def _score(self, session) -> float:
        if self.metric == "perplexity":
            return perplexity(session, self.batches)
        if self._reference is None:
            self._reference = create_session(self.model_path, provider=self.provider)
        return 1.0 - output_fidelity(self._reference, session, self.batches).mean_cosine
