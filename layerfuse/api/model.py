"""``layerfuse.Model``: an ONNX graph in memory with the folder facts layerfuse needs.

A model is an ``onnx_ir.Model`` (weights stay lazy: external data is read when a pass touches
it) plus its manifest (task, inputs, tokenizer) and the file it came from. Plans rewrite it in
place, so ``merge -> fuse -> quantize -> save`` composes without writing anything between
steps. Analyses that run onnxruntime (calibration, validation scores) or torch (recovery)
need a file: :meth:`Model.on_disk` hands them the model's own file while it is unchanged,
and otherwise a temporary copy beside it (same filesystem, removed afterwards), so a caller
never manages paths between steps.
"""

from __future__ import annotations

__all__ = ["Model", "load"]

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from layerfuse.files import staging_dir
from layerfuse.model.io import file_bytes, load_model, save_model, weight_bytes
from layerfuse.model.manifest import Manifest, carry_manifest, read_manifest
from layerfuse.model.stats import count_parameters
from layerfuse.passes.base import PROVENANCE_PLANS
from layerfuse.passes.plan import Plan


class Model:
    """An ONNX model and where its tokenizer and manifest live.

    Example::

        import layerfuse

        model = layerfuse.load("smollm2/model.onnx")
        print(model.parameters, model.manifest.task)
    """

    def __init__(self, graph: ir.Model, path: Path | None, manifest: Manifest | None) -> None:
        self.ir = graph
        self.path = path
        self.manifest = manifest
        self._written_history = self.history

    def __repr__(self) -> str:
        where = self.path if self.path else "not saved"
        return f"Model({where}, {self.parameters:,} parameters, plans {self.history or 'none'})"

    @property
    def history(self) -> tuple[str, ...]:
        """Schemas of the plans applied to this model since its original, oldest first."""
        return tuple(p for p in self.ir.metadata_props.get(PROVENANCE_PLANS, "").split(",") if p)

    @property
    def modified(self) -> bool:
        """Whether plans changed the graph since it was loaded or saved."""
        return self.path is None or self.history != self._written_history

    @property
    def parameters(self) -> int:
        """Logical weights, each shared initializer once (quantized weights at full count)."""
        return count_parameters(self.ir).weights

    @property
    def weight_bytes(self) -> int:
        """Bytes of the initializers in memory, each shared one once."""
        return weight_bytes(self.ir)

    @property
    def file_bytes(self) -> int | None:
        """Bytes of the model's files on disk, or None while it differs from them."""
        return None if self.modified else file_bytes(self.path)

    def apply(self, plan: Plan) -> Model:
        """Rewrite this model in place by ``plan`` and return it."""
        return plan.apply(self)

    def save(self, path: str | os.PathLike) -> Model:
        """Write the model (graph last, never a partial file) with its manifest and tokenizer.

        The in-memory model keeps reading its lazy weights from the files it was loaded
        from, which a save never overwrites, so it can be saved again or rewritten further.
        """
        target = Path(path)
        save_model(self.ir, target)
        if self.path is not None:
            carry_manifest(self.path, target)
        self.path, self._written_history = target, self.history
        self.manifest = read_manifest(target)
        return self

    @contextmanager
    def on_disk(self) -> Iterator[Path]:
        """A path onnxruntime and torch can open holding exactly this model.

        Its own file when unchanged; otherwise a copy in a staging folder beside it (or in
        the system's temporary folder for a model never saved), removed on exit.
        """
        if not self.modified:
            yield self.path
            return
        folder = self.path.parent if self.path is not None else Path(tempfile.gettempdir())
        with staging_dir(folder, kind="api") as staged:
            copy = staged / (self.path.name if self.path is not None else "model.onnx")
            save_model(self.ir, copy)
            if self.path is not None:
                carry_manifest(self.path, copy)
            yield copy


def load(path: str | os.PathLike) -> Model:
    """Open the model at ``path`` lazily (weights are read when a pass needs them).

    Raises :class:`layerfuse.errors.InvalidModelError` with one line saying what is wrong
    when the file is missing, truncated, or points at missing external data.
    """
    model_path = Path(path)
    return Model(load_model(model_path), model_path, read_manifest(model_path))
