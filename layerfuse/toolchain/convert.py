"""One driver for every conversion: run an onnxruntime tool, then prove the ties survived.

The tool (quantizer, fp16 converter, transformers optimizer) gets the source model and a
scratch folder and returns the converted proto. The driver then folds equal-content
initializers into one (a converter that writes an identical copy per consumer loses nothing
more than its duplicates), traces every tied set of the source into the result
(:mod:`layerfuse.toolchain.ties`), and refuses to write a model in which a tie was undone:
that would silently give back the bytes the tie removed. Output is written atomically with
the source folder's manifest and tokenizer, so ``bench`` and ``evaluate`` read it like any
other variant.
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

from layerfuse.errors import LayerfuseError
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.stats import model_stats
from layerfuse.toolchain.ties import TieCheck, check_ties, deduplicate_initializers, tied_sets

Transform = Callable[[Path, Path], onnx.ModelProto]


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
    sets = tied_sets(load_model(source))
    with tempfile.TemporaryDirectory(prefix="layerfuse-convert-") as scratch:
        try:
            proto = transform(source, Path(scratch))
        except LayerfuseError:
            raise
        except Exception as exc:  # onnxruntime's tools raise anything; report one line
            raise ConversionError(
                f"{kind} conversion of {source} failed: {_first_line(exc)}"
            ) from None
        converted = deduplicate_initializers(ir.serde.deserialize_model(proto))
        del proto
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
    save_model(converted, out)
    carry_manifest(source, out)
    return ConversionResult(
        path=out,
        kind=kind,
        ties=checks,
        source_unique_bytes=model_stats(source).unique_content_bytes,
        unique_bytes=model_stats(out).unique_content_bytes,
        details=details or {},
    )
