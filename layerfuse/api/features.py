"""Recover, evaluate, benchmark and quantize :class:`~layerfuse.api.model.Model`s.

The same functions the CLI runs, taking models instead of paths; a model changed in memory
is handed to onnxruntime or torch through :meth:`Model.on_disk`. Recovery and quantization
produce new weights, so they write a model to ``output`` and return it loaded.

Example::

    import layerfuse
    from layerfuse.recover import TrainSettings

    original = layerfuse.load("smollm2/model.onnx")
    merged = layerfuse.plan_merge(original, ratio="1/3").apply(layerfuse.load(original.path))
    result = layerfuse.recover_model(original, merged, "recovered/model.onnx",
                               settings=TrainSettings(steps=50))
    print(layerfuse.evaluate(result.model)["perplexity"])
"""

from __future__ import annotations

__all__ = ["Recovery", "bench", "evaluate", "quantize", "recover_model"]

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfuse.api.model import Model, load
from layerfuse.files import staging_dir
from layerfuse.passes.plan import Plan
from layerfuse.progress import SILENT, Reporter
from layerfuse.recover.local import LocalSettings
from layerfuse.recover.run import RecoverRequest
from layerfuse.recover.run import recover as run_recovery
from layerfuse.recover.settings import TrainSettings
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.evaluate import evaluate_model
from layerfuse.toolchain.quantize import quantize_model


@dataclass
class Recovery:
    """The recovered model and recovery's summary (losses, steps, local-stage errors)."""

    model: Model
    summary: dict = field(repr=False)


def recover_model(
    original: Model,
    optimized: Model,
    output: str | os.PathLike,
    *,
    plan: Plan | None = None,
    settings: TrainSettings | None = None,
    local: LocalSettings | None = None,
    reporter: Reporter = SILENT,
    **options: Any,
) -> Recovery:
    """Train ``optimized`` back toward ``original`` and write it to ``output``.

    (Named ``recover_model`` because ``layerfuse.recover`` is the recovery package.)

    ``options`` are :class:`~layerfuse.recover.run.RecoverRequest` fields (``objective``,
    ``train``, ``data``, ``device``, ...); ``plan`` adds its blocks to ``train="touched"``.
    """
    output = Path(output)
    with ExitStack() as stack:
        request = RecoverRequest(
            original=stack.enter_context(original.on_disk()),
            optimized=stack.enter_context(optimized.on_disk()),
            output=output,
            settings=settings or TrainSettings(),
            local=local or LocalSettings(),
            **options,
        )
        if plan is not None:
            folder = stack.enter_context(staging_dir(output.parent, kind="plan"))
            request.plan = plan.save(folder / "plan.json")
        summary = run_recovery(request, reporter)
    return Recovery(load(output), summary)


def evaluate(model: Model, *, reporter: Reporter = SILENT, **options: Any) -> dict:
    """Quality (perplexity or topic accuracy) and batch-1 latency; ``options`` as
    :func:`layerfuse.runtime.evaluate.evaluate_model` (``data``, ``tokens``, ``reference``)."""
    reference = options.pop("reference", None)
    with ExitStack() as stack:
        path = stack.enter_context(model.on_disk())
        if isinstance(reference, Model):
            reference = stack.enter_context(reference.on_disk())
        return evaluate_model(path, reference=reference, reporter=reporter, **options)


def bench(models: dict[str, Model], config: BenchConfig, *, reporter: Reporter = SILENT) -> dict:
    """Latency (interleaved, same inputs), memory and optionally quality of named models:
    the ``layerfuse.bench/1`` document the CLI writes."""
    with ExitStack() as stack:
        paths = [stack.enter_context(model.on_disk()) for model in models.values()]
        return run_bench(paths, config, names=list(models), reporter=reporter)


def quantize(
    model: Model, output: str | os.PathLike, scheme: str = "int4", **options: Any
) -> Model:
    """Quantize to ``int4`` (MatMulNBits) or ``int8`` into ``output`` and return it loaded;
    ``options`` as :func:`layerfuse.toolchain.quantize.quantize_model` (``block_size``, ...)."""
    with model.on_disk() as path:
        quantize_model(path, output, scheme, **options)
    return load(output)
