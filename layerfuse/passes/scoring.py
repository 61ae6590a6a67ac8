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

from layerfuse.export.datasets import make_batches
from layerfuse.export.manifest import require_manifest
from layerfuse.runtime.quality import output_fidelity, perplexity
from layerfuse.runtime.session import create_session, session_for_ir


class CandidateScorer:
    def __init__(
        self,
        model_path: str | os.PathLike,
        data: str,
        *,
        tokens: int,
        seq_len: int = 128,
        batch_size: int = 8,
        provider: str = "auto",
        split: str = "valid",
    ) -> None:
        self.model_path = Path(model_path)
        self.provider = provider
        self.batches = make_batches(
            self.model_path, data, split, tokens=tokens, seq_len=seq_len, batch_size=batch_size
        )
        task = require_manifest(self.model_path).task
        random_data = data == "random"
        self.metric = "perplexity" if task == "causal-lm" and not random_data else "output_cosine"
        self._reference = None

    def __call__(self, model: ir.Model) -> float:
        session = session_for_ir(model, self.model_path.parent, provider=self.provider)
        if self.metric == "perplexity":
            return perplexity(session, self.batches)
        if self._reference is None:
            self._reference = create_session(self.model_path, provider=self.provider)
        return 1.0 - output_fidelity(self._reference, session, self.batches).mean_cosine
