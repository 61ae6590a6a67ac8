"""``layerfuse.json``: what a model folder holds and how its graphs are fed.

Export writes it beside ``model.onnx`` with the tokenizer; every variant a pass writes into
another folder gets a copy, so calibration, evaluation and benchmarking can tokenize text and
build inputs for any graph of the family without going back to torch.

Folders written by onnxruntime-genai's model builder have no ``layerfuse.json`` but a
``genai_config.json`` and a tokenizer: their manifest is synthesized from those on every read
(nothing is written into the user's folder), and a variant of one gets the builder folder's
files with its ``genai_config.json`` updated (see :mod:`layerfuse.model.genai`).
"""

from __future__ import annotations

__all__ = ["MANIFEST_NAME", "Manifest", "carry_manifest", "read_manifest", "require_manifest"]

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layerfuse.errors import DataError
from layerfuse.files import write_json_atomic
from layerfuse.model.genai import carry_genai_folder, genai_manifest_fields

MANIFEST_NAME = "layerfuse.json"
SCHEMA = "layerfuse.manifest/1"


@dataclass
class Manifest:
    source: str
    origin: str
    task: str
    model_type: str
    inputs: list[str]
    output: str
    exporter: str
    opset: int
    tokenizer: str | None = None
    image_size: int | None = None
    verification: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    # KV-cache graphs: cache geometry, context length, special tokens, padding side.
    generation: dict = field(default_factory=dict)
    # Causal LMs: whether packed text windows start with BOS (export writes the tokenizer's
    # default; edit to override). None: not recorded (older manifests), ask the tokenizer.
    bos: bool | None = None

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        fields = {key: value for key, value in data.items() if key != "schema"}
        return cls(**fields)

    def write(self, folder: str | os.PathLike) -> Path:
        return write_json_atomic(Path(folder) / MANIFEST_NAME, self.to_json())


def read_manifest(model_path: str | os.PathLike) -> Manifest | None:
    path = Path(model_path).parent / MANIFEST_NAME
    if not path.is_file():
        fields = genai_manifest_fields(model_path)
        return None if fields is None else Manifest(**fields)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object was expected, not {type(data).__name__}")
        manifest = Manifest.from_json(data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    _confine(manifest.tokenizer, path)
    return manifest


def _confine(entry: str | None, manifest_path: Path) -> None:
    """A manifest names files inside its own folder only, as external data must.

    Otherwise ``"tokenizer": "../../data"`` would make every variant copy a folder from
    outside the model folder to outside the output folder.
    """
    if entry is None:
        return
    folder = manifest_path.parent.resolve()
    if not isinstance(entry, str) or os.path.isabs(entry):
        raise DataError(f"{manifest_path}: tokenizer '{entry}' must be a path inside the folder")
    if not (folder / entry).resolve().is_relative_to(folder):
        raise DataError(
            f"{manifest_path}: tokenizer '{entry}' points outside the model folder {folder}"
        )


def require_manifest(model_path: str | os.PathLike) -> Manifest:
    manifest = read_manifest(model_path)
    if manifest is None:
        raise DataError(
            f"no {MANIFEST_NAME} beside {model_path}: it tells layerfuse how to tokenize text for "
            f"this model; export the model with 'layerfuse export' or write the variant into the "
            f"folder of the model it came from"
        )
    return manifest


def carry_manifest(source_model: str | os.PathLike, target_model: str | os.PathLike) -> None:
    """Give ``target_model``'s folder the manifest and tokenizer of ``source_model``'s."""
    source_dir, target_dir = Path(source_model).parent, Path(target_model).parent
    if source_dir.resolve() == target_dir.resolve():
        return
    if not (source_dir / MANIFEST_NAME).is_file():
        carry_genai_folder(source_model, target_model)
        return
    manifest = read_manifest(source_model)
    if manifest is None:
        return
    if manifest.tokenizer and not (target_dir / manifest.tokenizer).exists():
        shutil.copytree(source_dir / manifest.tokenizer, target_dir / manifest.tokenizer)
    if not (target_dir / MANIFEST_NAME).exists():
        manifest.write(target_dir)
