"""The search's state file: what is done, so a rerun of the same command continues.

``OUTDIR/state.json`` holds a key (the model's fingerprint, the parsed options, the search
space, the seed) and one record per finished stage or item. It is rewritten atomically after
each, so an interrupted search loses at most the item it was working on. A rerun with other
options is refused instead of mixing two searches in one folder.
"""

from __future__ import annotations

__all__ = ["SearchState"]

import json
from pathlib import Path

from layerfuse.errors import LayerfuseError
from layerfuse.files import write_json_atomic

SCHEMA = "layerfuse.optimize-state/1"


class SearchState:
    """Records by section and name; every :meth:`put` is on disk before it returns."""

    def __init__(self, folder: Path, key: dict) -> None:
        self.path = folder / "state.json"
        self.key = key
        self.data: dict = {"schema": SCHEMA, "key": key, "done": {}}
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise LayerfuseError(f"{self.path}: cannot read the search state ({exc})") from None
            if stored.get("schema") != SCHEMA or stored.get("key") != key:
                raise LayerfuseError(
                    f"{folder} holds a search with other settings (model, target, limit, "
                    f"budget, space or seed); use another output folder or remove {self.path}"
                )
            self.data = stored

    @property
    def resumed(self) -> bool:
        return bool(self.data["done"])

    def get(self, section: str, name: str = "") -> dict | None:
        return self.data["done"].get(section, {}).get(name)

    def put(self, section: str, record, name: str = "") -> None:
        self.data["done"].setdefault(section, {})[name] = record
        write_json_atomic(self.path, self.data)
