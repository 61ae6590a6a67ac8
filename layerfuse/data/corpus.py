"""Real English text and labelled data from Debian's ``fortunes`` package.

No dataset hub is reachable, so calibration and evaluation text comes from a registry
package: ``fortunes`` (and ``fortunes-min``) hold 14k quotations, poems, definitions and jokes
in 40 topic files (about 2.7 MB, free licence). If the files are not installed system-wide,
``apt-get download`` fetches the two .deb files and they are unpacked into the layerfuse
cache (:mod:`layerfuse.data.debian`).

Splits are assigned by a hash of each entry's text, so they are stable across machines and
runs: the calib bucket (50%), ``valid`` (25%) for window selection, ``test`` (25%) for the
numbers in reports. The calib bucket is cut once more, in corpus order: its first
:data:`CALIB_RESERVE_CHARS` characters are ``calib`` (what calibration reads: a prefix of a few
thousand tokens, so every committed result keeps its calibration text), the rest is
``train`` (recovery training text, about 280k SmolLM2 tokens), disjoint from the other three.
The topic labels give a real classification task.
"""

from __future__ import annotations

__all__ = [
    "CALIB_RESERVE_CHARS",
    "SPLITS",
    "TOPIC_CLASSES",
    "Entry",
    "fortunes_dir",
    "load_entries",
    "split_texts",
    "topic_dataset",
]

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from layerfuse.data.debian import unpacked_package
from layerfuse.errors import DataError

SPLITS = ("calib", "valid", "test", "train")
# Characters of the calib bucket, in corpus order, kept for calibration (about 68k SmolLM2
# tokens, several times the largest calibration budget); the rest of the bucket is ``train``.
CALIB_RESERVE_CHARS = 256_000
_SYSTEM_DIR = Path("/usr/share/games/fortunes")
_DEBIAN_PACKAGES = ("fortunes", "fortunes-min")

# Label -> fortune topic files. Topics were grouped so each class has 500+ entries and the
# classes are distinguishable by content (not by style), e.g. law joins politics.
TOPIC_CLASSES = {
    "computers": ("computers", "linux", "perl", "debian", "linuxcookie"),
    "politics": ("politics", "law"),
    "poetry": ("songs-poems", "love", "literature"),
    "science": ("science", "medicine", "education"),
    "work": ("work",),
}


@dataclass(frozen=True)
class Entry:
    topic: str
    text: str

    @property
    def split(self) -> str:
        bucket = int(hashlib.sha256(self.text.encode()).hexdigest()[:8], 16) % 4
        return "calib" if bucket < 2 else ("valid" if bucket == 2 else "test")


def fortunes_dir() -> Path:
    """The folder of fortune topic files, downloading them into the cache if needed."""
    override = os.environ.get("LAYERFUSE_FORTUNES_DIR")
    if override:
        if not Path(override).is_dir():
            raise DataError(f"LAYERFUSE_FORTUNES_DIR={override} is not a folder")
        return Path(override)
    if (_SYSTEM_DIR / "computers").is_file():
        return _SYSTEM_DIR
    cached = unpacked_package(
        "fortunes", _DEBIAN_PACKAGES, "usr/share/games/fortunes/computers", "the fortunes corpus"
    )
    return cached / "usr/share/games/fortunes"


@lru_cache(maxsize=1)
def load_entries() -> tuple[Entry, ...]:
    """Every fortune as (topic, text), in a fixed order."""
    folder = fortunes_dir()
    entries = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.is_symlink():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for chunk in raw.split("\n%\n"):
            text = chunk.strip().strip("%").strip()
            if len(text) >= 20:
                entries.append(Entry(path.name, text))
    if not entries:
        raise DataError(f"{folder}: no fortune entries found")
    return tuple(entries)


def split_texts(split: str) -> list[str]:
    """All entry texts of one split, for calibration, perplexity or training."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (choose {', '.join(SPLITS)})")
    if split not in ("calib", "train"):
        return [entry.text for entry in load_entries() if entry.split == split]
    calib, train, used = [], [], 0
    for entry in load_entries():
        if entry.split != "calib":
            continue
        (calib if used < CALIB_RESERVE_CHARS else train).append(entry.text)
        used += len(entry.text)
    if split == "calib":
        return calib
    # Some fortunes appear in several topic files; a copy of a reserved one is not training text.
    reserved = set(calib)
    return [text for text in train if text not in reserved]


def topic_dataset(split: str, per_class: int = 150) -> tuple[list[str], list[int], list[str]]:
    """Texts, integer labels and label names for the topic classification task.

    ``train`` is the calib split and ``test`` the test split; each class is capped at
    ``per_class`` entries (in file order) so the classes are balanced.
    """
    source_split = {"train": "calib", "valid": "valid", "test": "test"}.get(split)
    if source_split is None:
        raise DataError(f"unknown topic split '{split}' (choose train, valid or test)")
    names = list(TOPIC_CLASSES)
    topic_to_label = {topic: i for i, name in enumerate(names) for topic in TOPIC_CLASSES[name]}
    texts: list[str] = []
    labels: list[int] = []
    counts = [0] * len(names)
    for entry in load_entries():
        label = topic_to_label.get(entry.topic)
        if label is None or entry.split != source_split or counts[label] >= per_class:
            continue
        counts[label] += 1
        texts.append(entry.text)
        labels.append(label)
    return texts, labels, names
