"""Data specs (``--calib``, ``--eval``) resolved into input batches for one model family.

A spec names where inputs come from:

- ``fortunes`` (default): real English text, see :mod:`layerfuse.data.corpus`;
- a path to a UTF-8 ``.txt`` file (paragraphs separated by blank lines), a ``.jsonl`` file
  (one ``{"text": ...}`` object a line) or a Hugging Face ``datasets`` folder written by
  ``save_to_disk`` (its ``text`` column; needs the ``datasets`` package): each text goes to a
  split by a hash of its content, 1/8 ``calib``, 3/8 ``train``, 1/4 ``valid``, 1/4 ``test``;
- either of the text specs followed by ``+gcide``, ``+pydocs`` (or both): more *training* text
  from Debian packages (:mod:`layerfuse.data.extra_text`), added to the ``train`` split only;
- ``random``: seeded random token ids or pixels, for smoke tests and output-fidelity checks
  only (never for quality claims).

The model's manifest says how to turn text into inputs (task, tokenizer, whether packed
windows start with BOS: its ``bos`` entry, else the tokenizer's default); a spec that cannot
feed the model (text for a vision model) is a :class:`DataError`, before any work is done.
"""

from __future__ import annotations

__all__ = [
    "DataSpec",
    "InputBatch",
    "fed_bos",
    "make_batches",
    "packed_bos",
    "parse_spec",
    "texts_for",
]

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from layerfuse.data import corpus
from layerfuse.data.extra_text import EXTRA_CORPORA, extra_texts
from layerfuse.data.tokens import adds_bos, load_tokenizer, packed_rows, sentence_batches
from layerfuse.errors import DataError
from layerfuse.model.manifest import Manifest, require_manifest

# Files datasets' save_to_disk writes into a Dataset or DatasetDict folder.
_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json")


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
    extras: tuple[str, ...] = ()

    def __str__(self) -> str:
        base = str(self.path) if self.kind == "text" else self.kind
        return "+".join((base, *self.extras))


def parse_spec(spec: str) -> DataSpec:
    base, *extras = spec.split("+")
    if extras and all(name in EXTRA_CORPORA for name in extras):
        if base == "random":
            raise DataError("random data takes no extra corpus; use fortunes+NAME or FILE+NAME")
        return replace(parse_spec(base), extras=tuple(dict.fromkeys(extras)))
    if spec in ("fortunes", "random"):
        return DataSpec(spec)
    path = Path(spec.removeprefix("text:"))
    if path.suffix in (".txt", ".jsonl") or spec.startswith("text:"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        return DataSpec("text", path)
    if path.is_dir() and any((path / name).is_file() for name in _DATASET_MARKERS):
        return DataSpec("text", path)
    raise DataError(
        f"unknown data '{spec}' (use fortunes, random, a .txt or .jsonl file, or a folder "
        f"written by datasets' save_to_disk; add +{'/+'.join(EXTRA_CORPORA)} for more "
        f"training text)"
    )


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: expected an object with a string 'text' field")
        texts.append(record["text"].strip())
    return texts


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a datasets folder, but the 'datasets' package is not installed "
            f"(pip install datasets)"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    parts = [loaded[name] for name in sorted(loaded)] if hasattr(loaded, "keys") else [loaded]
    if any("text" not in part.column_names for part in parts):
        raise DataError(f"{path}: the dataset has no 'text' column")
    return [text.strip() for part in parts for text in part["text"] if isinstance(text, str)]


def _source_texts(path: Path) -> list[str]:
    if path.is_dir():
        return _dataset_texts(path)
    try:
        if path.suffix == ".jsonl":
            return _jsonl_texts(path)
        return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); convert it, e.g. with "
            f"iconv -f latin1 -t utf-8"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _hash_split(text: str) -> str:
    """valid and test a quarter each; the calib half is cut into calib 1/4 and train 3/4."""
    code = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    bucket = code % 4
    if bucket >= 2:
        return "valid" if bucket == 2 else "test"
    return "calib" if (code // 4) % 4 == 0 else "train"


def texts_for(spec: DataSpec, split: str) -> list[str]:
    extra = [text for name in spec.extras for text in extra_texts(name)] if split == "train" else []
    if spec.kind == "fortunes":
        return corpus.split_texts(split) + extra
    assert spec.path is not None
    if split not in corpus.SPLITS:
        raise DataError(f"unknown split '{split}' (choose {', '.join(corpus.SPLITS)})")
    chosen = [text for text in filter(None, _source_texts(spec.path)) if _hash_split(text) == split]
    if not chosen:
        raise DataError(f"{spec.path}: no texts fall into the '{split}' split")
    return chosen + extra


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


def _check_calib_budget(spec: DataSpec, available: int, wanted: int) -> None:
    """Calibration reads a prefix of the calib split; asking for more than it holds would
    silently calibrate on less (and, for fortunes, the rest of the bucket is training text)."""
    if available < wanted:
        raise DataError(
            f"a calibration budget of {wanted} tokens exceeds the calib split of '{spec}' "
            f"({available} tokens); lower --calib-tokens"
        )


def packed_bos(manifest: Manifest, tokenizer) -> bool:
    """Whether a causal LM's packed windows start with BOS: the manifest's ``bos`` (written
    at export, editable to override), or for manifests older than that entry, the tokenizer's
    default, which is what export would have written."""
    if manifest.bos is None:
        return adds_bos(tokenizer)
    if not isinstance(manifest.bos, bool):
        raise DataError(f"the manifest's 'bos' is {manifest.bos!r}; write true or false")
    return manifest.bos


def _text_tokenizer(model_path: str | os.PathLike, manifest: Manifest):
    if not manifest.tokenizer:
        raise DataError(
            f"{model_path}: the manifest names no tokenizer to turn text into input_ids"
        )
    return load_tokenizer(Path(model_path).parent / manifest.tokenizer)


def fed_bos(model_path: str | os.PathLike, spec: DataSpec | str) -> bool | None:
    """Whether :func:`make_batches` starts the windows of ``spec`` with BOS for this model;
    None where there are no packed text windows (encoders, vision, random ids)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    manifest = require_manifest(model_path)
    if spec.kind == "random" or manifest.task != "causal-lm":
        return None
    return packed_bos(manifest, _text_tokenizer(model_path, manifest))


def make_batches(
    model_path: str | os.PathLike,
    spec: DataSpec | str,
    split: str,
    *,
    tokens: int,
    seq_len: int = 128,
    batch_size: int = 8,
    bos: bool | None = None,
) -> list[InputBatch]:
    """About ``tokens`` tokens of ``split`` as input batches for the model at ``model_path``.

    ``bos`` overrides :func:`packed_bos` for causal LMs (to reproduce a measurement made
    with or without it).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    manifest = require_manifest(model_path)
    if spec.kind == "random":
        return _random_batches(manifest, tokens, seq_len, batch_size)
    if manifest.task == "vision":
        raise DataError(
            f"'{spec}' is text, but {model_path} is a vision model fed with pixel_values; "
            f"use --calib random for vision models"
        )
    tokenizer = _text_tokenizer(model_path, manifest)
    texts = texts_for(spec, split)
    if manifest.task == "causal-lm":
        bos = packed_bos(manifest, tokenizer) if bos is None else bos
        rows = packed_rows(tokenizer, texts, seq_len=seq_len, max_tokens=tokens, bos=bos)
        if split == "calib":
            _check_calib_budget(spec, rows.size, max(1, tokens // seq_len) * seq_len)
        return [
            InputBatch({"input_ids": ids, "attention_mask": np.ones_like(ids)}, np.ones_like(ids))
            for ids in (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
        ]
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    ]
    chosen, total = [], 0
    for text, length in zip(texts, lengths, strict=True):
        if total >= tokens:
            break
        chosen.append(text)
        total += length
    if split == "calib":
        _check_calib_budget(spec, total, tokens)
    batches = sentence_batches(tokenizer, chosen, max_length=seq_len, batch_size=batch_size)
    return [InputBatch(b.feeds(), b.attention_mask) for b in batches]
