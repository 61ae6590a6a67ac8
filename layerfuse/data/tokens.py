"""Turn text into model inputs, batch by batch, never all at once.

Causal LMs get *packed* batches: documents joined with the EOS token and cut into windows of
``seq_len`` tokens, so no position is padding and every token counts for perplexity and
calibration. Encoders get *sentence* batches: one text per row, padded, with the attention
mask telling real tokens from padding (calibration then drops the padded rows).
"""

from __future__ import annotations

__all__ = [
    "TokenBatch",
    "count_batches",
    "load_tokenizer",
    "packed_batches",
    "packed_rows",
    "sentence_batches",
]

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerfuse.errors import DataError


@dataclass
class TokenBatch:
    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def token_count(self) -> int:
        return int(self.attention_mask.sum())

    def feeds(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def load_tokenizer(folder: str | os.PathLike):
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"tokenizer folder {path} is missing")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _token_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else None
    pieces: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        pieces.extend(ids)
        if separator is not None:
            pieces.append(separator)
    return np.asarray(pieces, dtype=np.int64)


def packed_rows(
    tokenizer, texts: Sequence[str], *, seq_len: int, max_tokens: int | None = None
) -> np.ndarray:
    """``[windows, seq_len]`` token ids: the concatenated texts cut into full windows."""
    stream = _token_stream(tokenizer, texts)
    windows = len(stream) // seq_len
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows == 0:
        raise DataError(f"the text has {len(stream)} tokens, fewer than one window of {seq_len}")
    return stream[: windows * seq_len].reshape(windows, seq_len)


def packed_batches(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
) -> Iterator[TokenBatch]:
    """Fixed-length windows of the concatenated texts; the last partial window is dropped."""
    rows = packed_rows(tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens)
    windows = rows.shape[0]
    for start in range(0, windows, batch_size):
        ids = rows[start : start + batch_size]
        yield TokenBatch(ids, np.ones_like(ids))


def sentence_batches(
    tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int
) -> Iterator[TokenBatch]:
    """One padded row per text, truncated to ``max_length`` tokens."""
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        yield TokenBatch(
            encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
        )


def count_batches(item_count: int, batch_size: int) -> int:
    return math.ceil(item_count / batch_size)
