"""Shared fixtures: tiny models exported once per test session, and real packaged models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("llama", "gpt2", "bert", "vit")
EXPORTERS = ("dynamo", "torchscript")


class TinyExports:
    """Exports tiny models lazily and keeps each (family, exporter) graph for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, str], Path] = {}

    def folder(self, family: str) -> Path:
        folder = self.root / "hf" / family
        if not (folder / "config.json").exists():
            tiny_models.save_folder(family, folder)
        return folder

    def model(self, family: str, exporter: str = "dynamo") -> Path:
        key = (family, exporter)
        if key not in self._done:
            from layerfuse.export.onnx_export import export_model
            from layerfuse.export.sources import load_source

            source = load_source(str(self.folder(family)))
            out = self.root / "onnx" / f"{family}-{exporter}"
            self._done[key] = export_model(source, out, exporter=exporter).model_path
        return self._done[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyExports:
    return TinyExports(tmp_path_factory.mktemp("tiny"))


class RealExports:
    """The packaged real models, exported once per session (minutes: marked slow)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._exports: dict[str, object] = {}
        self._sources: dict[str, object] = {}

    def source(self, name: str):
        if name not in self._sources:
            from layerfuse.export.sources import load_source

            self._sources[name] = load_source(name)
        return self._sources[name]

    def export(self, name: str):
        if name not in self._exports:
            from layerfuse.export.onnx_export import export_model

            self._exports[name] = export_model(self.source(name), self.root / name)
        return self._exports[name]

    def model(self, name: str) -> Path:
        return self.export(name).model_path


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> RealExports:
    return RealExports(tmp_path_factory.mktemp("real"))
