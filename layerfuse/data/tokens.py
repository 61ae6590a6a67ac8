"""Turn text into model inputs, batch by batch, never all at once.

Causal LMs get *packed* batches: documents joined with the EOS token and cut into windows of
``seq_len`` tokens, so no position is padding and every token counts for perplexity and
calibration. A window starts the way the model saw text in training: when its tokenizer puts
BOS in front of every text (Llama, Gemma), each window is BOS + ``seq_len - 1`` text tokens,
and the BOS is only ever an input, never a predicted target. Without it such models read
out-of-distribution input (a Gemma's perplexity: 408 without BOS, 47 with it).
Encoders get *sentence* batches: one text per row with the tokenizer's own special tokens
([CLS] ... [SEP]), padded, with the attention mask telling real tokens from padding
(calibration then drops the padded rows).
"""

from __future__ import annotations

__all__ = [
    "TokenBatch",
    "adds_bos",
    "load_tokenizer",
    "packed_batches",
    "packed_rows",
    "sentence_batches",
]

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


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts BOS in front of a text by default.

    This is how Hugging Face itself tells (a post-processor template, ``add_bos_token`` or a
    GGUF's ``add_bos_token`` flag all end up here), so it holds for every tokenizer class.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == bos


def _token_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else None
    pieces: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        pieces.extend(ids)
        if separator is not None:
            pieces.append(separator)
    return np.asarray(pieces, dtype=np.int64)


def packed_rows(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    max_tokens: int | None = None,
    bos: bool | None = None,
) -> np.ndarray:
    """``[windows, seq_len]`` token ids: the concatenated texts cut into full windows.

    ``bos`` (default: :func:`adds_bos`) starts every window with the BOS token, followed by
    ``seq_len - 1`` text tokens; next-token losses read targets from position 1 on, so BOS
    is fed but never predicted.
    """
    if bos is None:
        bos = adds_bos(tokenizer)
    if bos and tokenizer.bos_token_id is None:
        raise DataError("windows should start with BOS, but the tokenizer has no BOS token")
    stream = _token_stream(tokenizer, texts)
    text_len = seq_len - 1 if bos else seq_len
    if text_len < 1:
        raise DataError(f"a window of {seq_len} token leaves no room for text after BOS")
    windows = len(stream) // text_len
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // seq_len))
    if windows == 0:
        raise DataError(f"the text has {len(stream)} tokens, fewer than one window of {seq_len}")
    rows = stream[: windows * text_len].reshape(windows, text_len)
    if bos:
        rows = np.concatenate([np.full((windows, 1), tokenizer.bos_token_id, np.int64), rows], 1)
    return rows


def packed_batches(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    bos: bool | None = None,
) -> Iterator[TokenBatch]:
    """Fixed-length windows of the concatenated texts; the last partial window is dropped."""
    rows = packed_rows(tokenizer, texts, seq_len=seq_len, max_tokens=max_tokens, bos=bos)
    windows = rows.shape[0]
    for start in range(0, windows, batch_size):
        ids = rows[start : start + batch_size]
        yield TokenBatch(ids, np.ones_like(ids))


def sentence_batches(
    tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int
) -> Iterator[TokenBatch]:
    """One padded row per text, truncated to ``max_length`` tokens.

    The tokenizer adds its special tokens (an encoder's [CLS] and [SEP]): sentence
    embeddings and classification heads were trained on text framed by them.
    """
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
