"""One driver for every conversion: run an onnxruntime tool, then prove the ties survived.

The tool (quantizer, fp16 converter, transformers optimizer) gets the source model and a
scratch folder and returns the converted proto. The driver then folds equal-content
initializers into one (a converter that writes an identical copy per consumer loses nothing
more than its duplicates). A transform may instead return an :class:`onnx_ir.Model` it built
itself (the streaming int4 quantizer, whose weights stay lazy, some in the scratch folder,
which lives until the output is written): it is taken as it is, since folding would read every
weight. The driver then traces every tied set of the source into the result
(:mod:`layerfuse.toolchain.ties`), and refuses to write a model in which a tie was undone:
that would silently give back the bytes the tie removed.

Output is staged: saved into a temporary folder beside the destination, loaded back with
every check :func:`~layerfuse.model.io.load_model` makes, and only then published
(:mod:`layerfuse.model.publish`: weights under a name no graph reads, the graph rename
last). A result that fails those checks leaves an existing ``-o`` file as it was and nothing
else behind, and no file the source reads (its .onnx, its external data) is a destination.
The source folder's manifest and tokenizer follow, so ``bench`` and ``evaluate`` read the
output like any other variant.
"""

from __future__ import annotations

__all__ = ["ConversionError", "ConversionResult", "load_inlined", "run_conversion"]

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.inliner
import onnx_ir as ir

from layerfuse.errors import InvalidModelError, LayerfuseError
from layerfuse.files import refuse_overwriting_inputs, staging_dir
from layerfuse.model.io import load_model, model_files, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.publish import publish_model
from layerfuse.model.stats import ModelStats, model_stats
from layerfuse.toolchain.quiet import quiet_onnxruntime
from layerfuse.toolchain.ties import TieCheck, check_ties, deduplicate_initializers, tied_sets

Transform = Callable[[Path, Path], "onnx.ModelProto | ir.Model"]


class ConversionError(LayerfuseError):
    """A conversion failed or would have undone a tie; nothing was written."""


@dataclass
class ConversionResult:
    path: Path
    kind: str
    ties: list[TieCheck]
    source_unique_bytes: int
    unique_bytes: int
    details: dict

    @property
    def ties_kept(self) -> int:
        return sum(check.kept for check in self.ties)

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "ties": [check.to_json() for check in self.ties],
            "ties_kept": self.ties_kept,
            "source_unique_bytes": self.source_unique_bytes,
            "unique_bytes": self.unique_bytes,
            "details": self.details,
        }


def load_inlined(source: Path) -> onnx.ModelProto:
    """The source with its weights loaded and layerfuse's ``Fused*`` function nodes inlined:
    quantizers and the fp16 converter do not look inside local functions, so a fused FFN's
    weights would otherwise stay float32 (onnxruntime inlines them at load anyway)."""
    return onnx.inliner.inline_local_functions(onnx.load(source))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _convert(source: Path, kind: str, transform: Transform, scratch: Path) -> ir.Model:
    """Run the tool quietly; its result with nodes sorted (and a proto's equal initializers
    folded).

    onnxruntime's tools append the nodes they insert to the end of the graph: the fp16
    converter's Casts after float32 graph inputs (ViT's ``pixel_values``) and before
    blocked ops land after their readers. onnxruntime sorts on load, so the model runs, but
    it is not valid ONNX ("not topologically sorted"); a stable sort restores the order.
    """
    try:
        with quiet_onnxruntime():
            result = transform(source, scratch)
    except LayerfuseError:
        raise
    except Exception as exc:  # onnxruntime's tools raise anything; report one line
        raise ConversionError(f"{kind} conversion of {source} failed: {_first_line(exc)}") from None
    if isinstance(result, ir.Model):
        converted = result
    else:
        converted = deduplicate_initializers(ir.serde.deserialize_model(result))
        del result
    converted.graph.sort()
    return converted


def validate_staged(staged: Path) -> ModelStats:
    """The checks every command makes when it loads a model, on the staged output."""
    return model_stats(staged)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder``; the folders that did not exist, deepest first."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _write_staged(model: ir.Model, out: Path, source: Path, kind: str) -> ModelStats:
    """Save ``model`` in a staging folder beside ``out``, validate it there, then publish it
    (:func:`~layerfuse.model.publish.publish_model`: weights under a name no graph reads,
    the graph rename last). On failure the staging folder and any output folder this call
    created are gone and ``out`` is as it was."""
    created = _make_folders(out.parent)
    try:
        with staging_dir(out.parent, "convert") as tmp:
            staged = save_model(model, tmp / out.name)
            try:
                stats = validate_staged(staged)
            except InvalidModelError as exc:
                reason = str(exc).removeprefix(f"{staged}: ")
                raise ConversionError(
                    f"the {kind} conversion of {source} is not a valid model ({reason}); "
                    f"{out} left as it was"
                ) from None
            publish_model(staged, out)
    except BaseException:
        for folder in created:
            if any(folder.iterdir()):
                break
            folder.rmdir()
        raise
    return stats


def run_conversion(
    source: str | os.PathLike,
    out: str | os.PathLike,
    kind: str,
    transform: Transform,
    details: dict | None = None,
) -> ConversionResult:
    """Convert ``source`` with ``transform`` into ``out`` (an .onnx path), keeping ties."""
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ConversionError(f"output {out} is the source model; write the {kind} model elsewhere")
    model = load_model(source)
    refuse_overwriting_inputs(model_files(source), [out])
    sets = tied_sets(model)
    source_unique_bytes = model_stats(source).unique_content_bytes
    with tempfile.TemporaryDirectory(prefix="layerfuse-convert-") as scratch:
        converted = _convert(source, kind, transform, Path(scratch))
        checks = check_ties(sets, converted)
        broken = [check for check in checks if not check.kept]
        if broken:
            names = ", ".join(
                f"{c.weight} ({c.readers} readers -> {c.reads or 'nothing'})" for c in broken[:3]
            )
            raise ConversionError(
                f"{kind} conversion undid {len(broken)} of {len(checks)} ties of {source} "
                f"({names}); no output written"
            )
        stats = _write_staged(converted, out, source, kind)
    carry_manifest(source, out)
    return ConversionResult(
        path=out,
        kind=kind,
        ties=checks,
        source_unique_bytes=source_unique_bytes,
        unique_bytes=stats.unique_content_bytes,
        details=details or {},
    )
