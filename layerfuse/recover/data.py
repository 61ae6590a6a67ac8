"""Training text as rows that can be shuffled, sharded and replayed exactly.

Recovery reads the ``train`` split (disjoint from calib, valid and test; see
:mod:`layerfuse.data.corpus` and :mod:`layerfuse.data.batches`). Causal LMs get packed
windows of ``seq_len`` tokens (no padding, every position is a target); encoders get one
sentence a row, padded per batch with a mask.

The order is a pure function of the seed and the optimizer step: step ``s`` reads rows
``[s*G, (s+1)*G)`` of an endless sequence of seeded epoch permutations (``G`` = the global
batch). A resumed run therefore needs nothing but the step number to read exactly the rows an
uninterrupted run would have read, and every process of a distributed run computes the same
global batch and takes its own share of it.
"""

from __future__ import annotations

__all__ = ["TrainingData", "load_training_data"]

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerfuse.data.batches import InputBatch, parse_spec, texts_for
from layerfuse.data.tokens import load_tokenizer, packed_rows
from layerfuse.errors import DataError
from layerfuse.model.manifest import require_manifest


@dataclass
class TrainingData:
    """Token rows of one split; ``rows[i]`` is a 1-D int64 array."""

    rows: list[np.ndarray]
    pad_id: int
    packed: bool

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        return int(sum(len(row) for row in self.rows))

    def step_indices(self, step: int, global_batch: int, seed: int) -> np.ndarray:
        """Row indices of optimizer step ``step`` (0-based), epoch after seeded epoch."""
        count = len(self.rows)
        if count < global_batch:
            raise DataError(
                f"the training text holds {count} rows, fewer than one global batch of "
                f"{global_batch}; use more text or a smaller --batch-size/--grad-accum"
            )
        first = step * global_batch
        picked = []
        for position in range(first, first + global_batch):
            epoch, offset = divmod(position, count)
            picked.append(self._permutation(epoch, seed)[offset])
        return np.asarray(picked, dtype=np.int64)

    def _permutation(self, epoch: int, seed: int) -> np.ndarray:
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != (epoch, seed):
            order = np.random.default_rng([seed, epoch]).permutation(len(self.rows))
            self._cache = ((epoch, seed), order)
        return self._cache[1]

    def batch(self, indices: np.ndarray) -> InputBatch:
        """The rows at ``indices`` as model feeds (padded to the longest, with a mask)."""
        rows = [self.rows[i] for i in indices]
        width = max(len(row) for row in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for line, row in enumerate(rows):
            ids[line, : len(row)] = row
            mask[line, : len(row)] = 1
        return InputBatch({"input_ids": ids, "attention_mask": mask}, mask)


def load_training_data(
    model_path: str | os.PathLike, data: str, split: str, *, seq_len: int
) -> TrainingData:
    """Every row of ``split`` of ``data`` tokenized for the model at ``model_path``."""
    spec = parse_spec(data)
    if spec.kind == "random":
        raise DataError("recovery trains on text: use --data fortunes or a text file, not random")
    manifest = require_manifest(model_path)
    if manifest.task not in ("causal-lm", "encoder") or not manifest.tokenizer:
        raise DataError(
            f"{model_path}: recovery supports text models (causal LMs and encoders) with a "
            f"tokenizer; this one is a {manifest.task} model"
        )
    tokenizer = load_tokenizer(Path(model_path).parent / manifest.tokenizer)
    texts = texts_for(spec, split)
    if manifest.task == "causal-lm":
        rows = list(packed_rows(tokenizer, texts, seq_len=seq_len))
        return TrainingData(rows, int(tokenizer.pad_token_id or 0), packed=True)
    encoded = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    rows = [np.asarray(ids, dtype=np.int64) for ids in encoded if len(ids) > 2]
    return TrainingData(rows, int(tokenizer.pad_token_id or 0), packed=False)
