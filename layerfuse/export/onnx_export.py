"""Export a torch model to ONNX and prove the graph computes what torch computes.

Both torch exporters are supported: ``dynamo`` (torch.export, the default and the only one
that handles recent transformers Llama/GPT-2 without help) and ``torchscript`` (the legacy
tracer, whose graphs still reach users). The graph is written into a temporary folder, run
in onnxruntime on inputs of a different shape than the trace (so a baked-in shape fails), and
compared with torch; only a graph within tolerance is moved into place.

``kv_cache=True`` (causal LMs, dynamo only) exports the generation signature of
:mod:`layerfuse.export.kv_cache` instead and records it in the manifest's ``generation``
entry; the default stays the cache-free graph every pass and benchmark was built on.
"""

from __future__ import annotations

__all__ = ["EXPORTERS", "ExportResult", "check_export_options", "example_inputs", "export_model"]

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerfuse.errors import LayerfuseError
from layerfuse.export.kv_cache import (
    cache_dynamic_shapes,
    cache_trace_args,
    check_cache_export,
    generation_summary,
    verify_with_cache,
)
from layerfuse.export.sources import ModelSource
from layerfuse.export.wrappers import TASK_IO, cache_geometry, cache_io_names, wrap_for_export
from layerfuse.files import staging_dir
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import Manifest
from layerfuse.model.publish import publish_model
from layerfuse.progress import SILENT, Reporter

EXPORTERS = ("dynamo", "torchscript")
MODEL_FILE = "model.onnx"
_TRACE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world"]
_VERIFY_TEXTS = [
    "Feed-forward layers hold most of a transformer's parameters.",
    "Short one.",
    "An exported graph must compute exactly what the original model computes, token by token.",
]


@dataclass
class ExportResult:
    model_path: Path
    manifest: Manifest
    max_abs_diff: float
    seconds: float


def _image_size(config) -> int:
    size = getattr(config, "image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def example_inputs(source: ModelSource, texts: list[str], seed: int = 0) -> dict:
    """Torch inputs for the wrapped model: tokenized ``texts``, or seeded random pixels."""
    import torch

    if source.task == "vision":
        size = _image_size(source.config)
        generator = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(len(texts), 3, size, size, generator=generator)}
    tokenizer = source.tokenizer
    if tokenizer is None:
        raise LayerfuseError(f"model '{source.name}' has no tokenizer; cannot build text inputs")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    return {name: encoded[name].to(torch.int64) for name in ("input_ids", "attention_mask")}


def _dynamic_axes(input_names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    return {
        name: {0: "batch"} if name == "pixel_values" else {0: "batch", 1: "sequence"}
        for name in input_names
    }


def _run_dynamo(wrapper, args: tuple, path: Path, opset: int, names, shapes) -> None:
    import torch

    input_names, output_names = names
    program = torch.onnx.export(
        wrapper,
        args,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=shapes,
        dynamo=True,
        opset_version=opset,
        verbose=False,
    )
    save_model(program.model, path)


def _run_exporter(wrapper, args: tuple, path: Path, exporter: str, opset: int, task: str) -> None:
    import torch

    input_names, output_name = TASK_IO[task]
    axes = _dynamic_axes(input_names)
    if exporter == "dynamo":
        _run_dynamo(wrapper, args, path, opset, (input_names, [output_name]), axes)
        return
    raw = path.with_name("torchscript.onnx")
    torch.onnx.export(
        wrapper,
        args,
        str(raw),
        input_names=list(input_names),
        output_names=[output_name],
        dynamic_axes={**axes, output_name: {0: "batch"}},
        dynamo=False,
        opset_version=opset,
    )
    save_model(load_model(raw), path)


def _cpu_session(path: Path):
    from layerfuse.runtime.session import create_session

    return create_session(path, provider="cpu")


def _verify(source: ModelSource, wrapper, path: Path) -> float:
    """Largest |onnxruntime - torch| over the positions the attention mask marks valid.

    Padded positions are left out: their values mean nothing, and with left-padding
    tokenizers they differ between runtimes by design (fully masked softmax rows).
    """
    import torch

    from layerfuse.runtime.calibration import token_rows

    inputs = example_inputs(source, _VERIFY_TEXTS, seed=1)
    with torch.no_grad():
        expected = wrapper(*inputs.values()).numpy()
    session = _cpu_session(path)
    actual = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
    if actual.shape != expected.shape:
        raise LayerfuseError(
            f"exported graph returns shape {actual.shape}, torch returns {expected.shape}"
        )
    mask = inputs["attention_mask"].numpy() if "attention_mask" in inputs else None
    if mask is not None and actual.shape[:2] != mask.shape:
        mask = None
    return float(np.max(np.abs(token_rows(actual, mask) - token_rows(expected, mask))))


def _config_summary(config) -> dict:
    keys = {
        "num_layers": ("num_hidden_layers", "n_layer"),
        "hidden_size": ("hidden_size", "n_embd"),
        "intermediate_size": ("intermediate_size", "n_inner"),
        "num_attention_heads": ("num_attention_heads", "n_head"),
        "vocab_size": ("vocab_size",),
        "max_positions": ("max_position_embeddings", "n_positions", "n_ctx"),
    }
    summary = {}
    for key, candidates in keys.items():
        for attribute in candidates:
            value = getattr(config, attribute, None)
            if value is not None:
                summary[key] = int(value)
                break
    return summary


def _exporter_failure(name: str, exporter: str, exc: Exception) -> str:
    """One line from a torch exporter's failure: its first message line and what to try."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    hint = "; --exporter torchscript may succeed" if exporter == "dynamo" else ""
    return f"the {exporter} exporter failed on {name}: {reason[:300]}{hint}"


def _export_staged(
    source: ModelSource, staged: Path, exporter: str, opset: int, kv_cache: bool
) -> tuple[float, dict, object]:
    """Export into ``staged`` and compare with torch: (max diff, per-check diffs, geometry)."""
    import torch

    wrapper = wrap_for_export(source.model, source.task, kv_cache=kv_cache)
    geometry = cache_geometry(source.model) if kv_cache else None
    try:
        with torch.no_grad():
            if geometry is not None:
                args = cache_trace_args(source.tokenizer, _TRACE_TEXTS, geometry)
                names = cache_io_names(geometry.num_layers)
                shapes = cache_dynamic_shapes(geometry.num_layers)
                _run_dynamo(wrapper, args, staged, opset, names, shapes)
            else:
                args = tuple(example_inputs(source, _TRACE_TEXTS).values())
                _run_exporter(wrapper, args, staged, exporter, opset, source.task)
    except LayerfuseError:
        raise
    except Exception as exc:  # torch's exporters raise anything; the user needs one line
        raise LayerfuseError(_exporter_failure(source.name, exporter, exc)) from None
    if geometry is None:
        return _verify(source, wrapper, staged), {}, None
    session = _cpu_session(staged)
    checks = verify_with_cache(wrapper, session, source.tokenizer, _VERIFY_TEXTS, geometry)
    return max(checks.values()), checks, geometry


def check_export_options(task: str, exporter: str, opset: int, kv_cache: bool) -> None:
    """Refuse options that cannot work; the CLI calls this before loading any weights."""
    if exporter not in EXPORTERS:
        raise LayerfuseError(f"unknown exporter '{exporter}' (choose {' or '.join(EXPORTERS)})")
    if opset < 18:
        raise LayerfuseError(f"opset {opset} is too old; layerfuse exports at opset 18 or newer")
    if kv_cache and task != "causal-lm":
        raise LayerfuseError(
            f"--kv-cache exports the generation signature of causal LMs, not of task {task}"
        )
    if kv_cache and exporter != "dynamo":
        raise LayerfuseError("--kv-cache needs the dynamo exporter")


def export_model(
    source: ModelSource,
    out_dir: str | os.PathLike,
    *,
    exporter: str = "dynamo",
    opset: int = 18,
    tolerance: float = 1e-3,
    kv_cache: bool = False,
    reporter: Reporter = SILENT,
) -> ExportResult:
    """Export ``source`` to ``out_dir/model.onnx`` with its tokenizer and manifest."""
    check_export_options(source.task, exporter, opset, kv_cache)
    if kv_cache:
        check_cache_export(source, exporter)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with staging_dir(out_dir, "export") as tmp:
        staged = tmp / MODEL_FILE
        reporter.step(f"exporting {source.name} with the {exporter} exporter (opset {opset})")
        diff, checks, geometry = _export_staged(source, staged, exporter, opset, kv_cache)
        if not diff <= tolerance:
            raise LayerfuseError(
                f"exported graph differs from torch by {diff:.3g} (tolerance {tolerance:g}); "
                f"nothing was written"
            )
        target = publish_model(staged, out_dir / MODEL_FILE)
    tokenizer_dir = None
    if source.tokenizer is not None:
        tokenizer_dir = "tokenizer"
        source.tokenizer.save_pretrained(out_dir / tokenizer_dir)
    input_names, output_name = TASK_IO[source.task]
    if geometry is not None:
        input_names = tuple(cache_io_names(geometry.num_layers)[0][:3])
    manifest = Manifest(
        source=source.name,
        origin=source.origin,
        task=source.task,
        model_type=str(getattr(source.config, "model_type", "unknown")),
        inputs=list(input_names),
        output=output_name,
        exporter=exporter,
        opset=opset,
        tokenizer=tokenizer_dir,
        image_size=_image_size(source.config) if source.task == "vision" else None,
        verification={"max_abs_diff": diff, "tolerance": tolerance, "batch": len(_VERIFY_TEXTS)}
        | checks,
        config=_config_summary(source.config),
        generation={} if geometry is None else generation_summary(source, geometry),
        bos=source.bos,
    )
    manifest.write(out_dir)
    return ExportResult(target, manifest, diff, time.perf_counter() - started)
