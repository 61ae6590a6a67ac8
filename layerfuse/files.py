"""Write result files so that a reader never sees half of one.

Every file layerfuse writes outside a model folder (plans, manifests, reports, benchmark
results) goes through here: the text lands in a temporary file beside the target and is moved
into place with one atomic rename, so an interrupted run leaves the previous file intact.
"""

from __future__ import annotations

__all__ = ["write_json_atomic", "write_text_atomic"]

import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")
