"""Data specs (``--calib``, ``--eval``) resolved into input batches for one model family.

A spec names where inputs come from:

- ``fortunes`` (default): real English text, see :mod:`layerfuse.data.corpus`;
- a path to a UTF-8 ``.txt`` file: paragraphs (blank-line separated) split by hash like the
  corpus;
- ``random``: seeded random token ids or pixels, for smoke tests and output-fidelity checks
  only (never for quality claims).

The model's manifest says how to turn text into inputs (task, tokenizer); a spec that cannot
feed the model (text for a vision model) is a :class:`DataError`, before any work is done.
"""

from __future__ import annotations

__all__ = ["DataSpec", "InputBatch", "make_batches", "parse_spec", "texts_for"]

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerfuse.data import corpus
from layerfuse.data.tokens import load_tokenizer, packed_batches, sentence_batches
from layerfuse.errors import DataError
from layerfuse.model.manifest import Manifest, require_manifest


@dataclass
class InputBatch:
    """Feeds for one run, and which positions of the output are real tokens."""

    feeds: dict[str, np.ndarray]
    mask: np.ndarray | None

    @property
    def rows(self) -> int:
        return (
            int(self.mask.sum())
            if self.mask is not None
            else int(next(iter(self.feeds.values())).shape[0])
        )


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return str(self.path) if self.kind == "text" else self.kind


def parse_spec(spec: str) -> DataSpec:
    if spec in ("fortunes", "random"):
        return DataSpec(spec)
    path = Path(spec.removeprefix("text:"))
    if path.suffix == ".txt" or spec.startswith("text:"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        return DataSpec("text", path)
    raise DataError(f"unknown data '{spec}' (use fortunes, random, or a path to a .txt file)")


def texts_for(spec: DataSpec, split: str) -> list[str]:
    if spec.kind == "fortunes":
        return corpus.split_texts(split)
    assert spec.path is not None
    paragraphs = [p.strip() for p in spec.path.read_text(encoding="utf-8").split("\n\n")]
    chosen = []
    for text in filter(None, paragraphs):
        bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 4
        if {"calib": bucket < 2, "valid": bucket == 2, "test": bucket == 3}[split]:
            chosen.append(text)
    if not chosen:
        raise DataError(f"{spec.path}: no paragraphs fall into the '{split}' split")
    return chosen


def _random_batches(manifest: Manifest, tokens: int, seq_len: int, batch_size: int) -> list:
    rng = np.random.default_rng(0)
    if manifest.task == "vision":
        size = manifest.image_size or 224
        count = max(1, tokens // 64)
        return [
            InputBatch(
                {
                    "pixel_values": rng.standard_normal(
                        (min(batch_size, count - start), 3, size, size)
                    ).astype(np.float32)
                },
                None,
            )
            for start in range(0, count, batch_size)
        ]
    vocab = int(manifest.config.get("vocab_size", 1000))
    rows = max(1, tokens // seq_len)
    batches = []
    for start in range(0, rows, batch_size):
        ids = rng.integers(0, vocab, size=(min(batch_size, rows - start), seq_len))
        mask = np.ones_like(ids)
        batches.append(InputBatch({"input_ids": ids, "attention_mask": mask}, mask))
    return batches


def make_batches(
    model_path: str | os.PathLike,
    spec: DataSpec | str,
    split: str,
    *,
    tokens: int,
    seq_len: int = 128,
    batch_size: int = 8,
) -> list[InputBatch]:
    """About ``tokens`` tokens of ``split`` as input batches for the model at ``model_path``."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    manifest = require_manifest(model_path)
    if spec.kind == "random":
        return _random_batches(manifest, tokens, seq_len, batch_size)
    if manifest.task == "vision":
        raise DataError(
            f"'{spec}' is text, but {model_path} is a vision model fed with pixel_values; "
            f"use --calib random for vision models"
        )
    if not manifest.tokenizer:
        raise DataError(
            f"{model_path}: the manifest names no tokenizer to turn text into input_ids"
        )
    tokenizer = load_tokenizer(Path(model_path).parent / manifest.tokenizer)
    texts = texts_for(spec, split)
    if manifest.task == "causal-lm":
        batches = packed_batches(
            tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_tokens=tokens
        )
        return [InputBatch(b.feeds(), b.attention_mask) for b in batches]
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    ]
    chosen, total = [], 0
    for text, length in zip(texts, lengths, strict=True):
        if total >= tokens:
            break
        chosen.append(text)
        total += length
    batches = sentence_batches(tokenizer, chosen, max_length=seq_len, batch_size=batch_size)
    return [InputBatch(b.feeds(), b.attention_mask) for b in batches]
