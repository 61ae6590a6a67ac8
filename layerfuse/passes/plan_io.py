"""What every plan shares: atomic JSON files, schema checks, and the model fingerprint check."""

from __future__ import annotations

__all__ = [
    "check_fingerprint",
    "check_plan_fits",
    "parse_ranges",
    "read_plan_json",
    "write_json_atomic",
]

import json
import os
from pathlib import Path

import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.passes.detect import Block, detect_structure, fingerprint


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_plan_json(path: str | os.PathLike, schema: str) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else None
        raise PlanError(f"{path}: not a {schema} plan (schema {found!r})")
    return data


def check_fingerprint(model: ir.Model, expected: str) -> None:
    actual = fingerprint(model)
    if actual != expected:
        raise PlanError(
            f"the plan was made for a model with fingerprint {expected}, this one has {actual}"
        )


def check_plan_fits(model: ir.Model, expected_fingerprint: str, num_blocks: int) -> list[Block]:
    """The model's blocks, after checking the plan was made for this model."""
    check_fingerprint(model, expected_fingerprint)
    blocks = detect_structure(model).blocks
    if len(blocks) != num_blocks:
        raise PlanError(f"the plan expects {num_blocks} blocks, found {len(blocks)}")
    return blocks


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"3-8,12-15"`` -> ``[(3, 8), (12, 15)]`` (inclusive block indices)."""
    ranges = []
    for part in text.split(","):
        try:
            first, last = (int(x) for x in part.strip().split("-"))
        except ValueError:
            raise PlanError(f"window '{part}' is not a range like 3-8") from None
        ranges.append((first, last))
    return ranges
