"""The search space of ``optimize``: which kinds of candidates, how screened, how recovered.

A JSON file of sections (every key optional; ``layerfuse optimize --write-space FILE`` writes
the defaults to start from). How much to remove is never in the file: the target decides it,
and each kind proposes the smallest change that meets it (plus ``extra`` units more, for
variety). See ``docs/optimize.md`` for the format.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SPACE", "SearchSpace", "load_space", "space_document", "write_default_space"]

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

from layerfuse.errors import LayerfuseError
from layerfuse.files import write_json_atomic

SCHEMA = "layerfuse.optimize-space/1"

DEFAULT_SPACE: dict = {
    # Tie FFs of consecutive blocks (aligned merge); windows: how many windows share the
    # removal; relax_ranks: 0 is a plain tie, R adds each tied layer a rank-R delta.
    "merge": {"enabled": True, "windows": [1, 2], "method": "permute", "relax_ranks": [0, 8]},
    # Drop whole blocks (ShortGPT block influence) or sublayers; extra: counts beyond the
    # smallest that meets the target.
    "prune": {"enabled": True, "targets": ["block"], "select": "influence", "extra": [0]},
    # Prune the blocks of lowest influence AND tie FFs in one window of the rest (one plan of
    # each kind, the merge planned on the pruned model); prune_shares: the part of the
    # removal pruning takes.
    "hybrid": {"enabled": True, "prune_shares": [0.5]},
    # Remove attention sublayers (least important on validation): mainly a latency lever.
    "attention": {"enabled": True, "extra": [0]},
    # FFN Fusion: remove as many attention sublayers, then fuse each run of FFs left
    # without attention between them into one wide FF (fewer sequential steps).
    "fuse": {"enabled": True, "extra": [0]},
    # Training-free screening on the valid split (perplexity; output cosine for encoders).
    "screen": {"calib_tokens": 8192, "valid_tokens": 4096, "seq_len": 128},
    # How many of the best screened candidates get recovered (the budget is split among them).
    "finalists": 3,
    # Recovery of each finalist: local reconstruction steps (merges), then distillation.
    # scout_share: the part of the budget split evenly among the finalists; the rest continues
    # the one that scores best on validation after it (1: an even split, no race).
    "recover": {
        "local_steps": 150,
        "batch_size": 4,
        "grad_accum": 1,
        "seq_len": 128,
        "lr": 5e-4,
        "train": "all",
        "max_steps": 2000,
        "scout_share": 0.4,
    },
    # Side-by-side measurement of the original and every finalist.
    # memory: resident bytes of a session after one run, each graph in a fresh process;
    # decode: tokens/s of step-by-step generation (graphs exported with a KV cache only).
    "measure": {
        "test_tokens": 8192,
        "shape": "1x128",
        "latency_runs": 10,
        "memory": True,
        "decode": {"batch": 1, "context": 64, "new_tokens": 32, "repeats": 3},
    },
}

_TYPES = {bool: "true/false", int: "a whole number", float: "a number", str: "a string"}


def _check(value, default, where: str):
    """``value`` if it has the type ``default`` has (ints accepted for floats), else an error."""
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise LayerfuseError(f"search space: {where} must be an object")
        unknown = sorted(set(value) - set(default))
        if unknown:
            raise LayerfuseError(
                f"search space: unknown key {where}.{unknown[0]} (known: {', '.join(default)})"
            )
        return {k: _check(value.get(k, d), d, f"{where}.{k}") for k, d in default.items()}
    if isinstance(default, list):
        if not isinstance(value, list) or not value:
            raise LayerfuseError(f"search space: {where} must be a non-empty list")
        return [_check(item, default[0], f"{where}[]") for item in value]
    kind = type(default)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise LayerfuseError(f"search space: {where} must be {_TYPES[kind]}, not {value!r}")
    if kind in (int, float) and value < 0:
        raise LayerfuseError(f"search space: {where} must not be negative, not {value}")
    return value


@dataclass(frozen=True)
class SearchSpace:
    """The checked sections of a search-space document (see :data:`DEFAULT_SPACE`)."""

    merge: dict
    prune: dict
    hybrid: dict
    attention: dict
    fuse: dict
    screen: dict
    finalists: int
    recover: dict
    measure: dict

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **copy.deepcopy(self.__dict__)}


def space_document(data: dict) -> SearchSpace:
    """Check ``data`` against the defaults' shape and fill in what it leaves out."""
    data = {k: v for k, v in data.items() if k != "schema"}
    checked = _check(data, DEFAULT_SPACE, "space")
    if checked["finalists"] < 1:
        raise LayerfuseError("search space: finalists must be at least 1")
    if checked["merge"]["method"] not in ("permute", "vanilla"):
        raise LayerfuseError("search space: merge.method must be permute or vanilla")
    if checked["recover"]["train"] not in ("all", "touched"):
        raise LayerfuseError("search space: recover.train must be all or touched")
    if any(not 0 < share < 1 for share in checked["hybrid"]["prune_shares"]):
        raise LayerfuseError("search space: hybrid.prune_shares must lie between 0 and 1")
    if not 0 < checked["recover"]["scout_share"] <= 1:
        raise LayerfuseError("search space: recover.scout_share must lie in (0, 1]")
    for target in checked["prune"]["targets"]:
        if target not in ("block", "ff"):
            raise LayerfuseError(f"search space: prune.targets: '{target}' is not block or ff")
    return SearchSpace(**checked)


def load_space(path: str | os.PathLike | None) -> SearchSpace:
    """The search space in the JSON file at ``path``, or the defaults when None."""
    if path is None:
        return space_document({})
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerfuseError(f"{path}: cannot read the search space ({exc})") from None
    if not isinstance(data, dict):
        raise LayerfuseError(f"{path}: a search space is a JSON object of sections")
    if data.get("schema", SCHEMA) != SCHEMA:
        raise LayerfuseError(f"{path}: not a {SCHEMA} file (schema {data.get('schema')!r})")
    return space_document(data)


def write_default_space(path: str | os.PathLike) -> Path:
    return write_json_atomic(path, {"schema": SCHEMA, **copy.deepcopy(DEFAULT_SPACE)})
