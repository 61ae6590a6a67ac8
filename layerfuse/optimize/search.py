"""``optimize``: from a target, a quality limit and a budget to the best model, with evidence.

Stages, each recorded in ``OUTDIR/state.json`` as it finishes (a rerun skips what is done):

1. propose candidates that should meet the target (:mod:`~layerfuse.optimize.candidates`);
2. screen them without training (:mod:`~layerfuse.optimize.screen`);
3. recover the best ``finalists`` that meet the target within the budget: scout each, then
   train the leader (:mod:`~layerfuse.optimize.race`, :mod:`~layerfuse.optimize.recovery`);
4. measure the original and the finalists side by side (:mod:`~layerfuse.optimize.measure`);
5. pick the winner, write it and the report (:mod:`~layerfuse.optimize.outcome`).
"""

from __future__ import annotations

__all__ = ["STAGES", "optimize"]

import math
import time
from pathlib import Path

from layerfuse.errors import LayerfuseError
from layerfuse.files import refuse_overwriting_inputs
from layerfuse.model.manifest import require_manifest
from layerfuse.model.publish import model_files
from layerfuse.optimize.candidates import Candidate, SizeModel, propose
from layerfuse.optimize.measure import measure_models
from layerfuse.optimize.outcome import write_outcome
from layerfuse.optimize.race import recover_finalists
from layerfuse.optimize.recovery import cpu_seconds
from layerfuse.optimize.request import OptimizeRequest
from layerfuse.optimize.screen import ScreenContext, screen_candidate, screen_original
from layerfuse.optimize.state import SearchState
from layerfuse.passes.planner import DataSettings
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.evaluate import quality_metric

STAGES = ("screen", "recover", "measure", "report")


class _Timer:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def record(self) -> dict:
        return {
            "wall_seconds": time.perf_counter() - self.wall,
            "cpu_seconds": cpu_seconds() - self.cpu,
        }


def _data_settings(request: OptimizeRequest) -> DataSettings:
    s = request.space.screen
    return DataSettings(
        data=request.data,
        calib_tokens=s["calib_tokens"],
        valid_tokens=s["valid_tokens"],
        seq_len=s["seq_len"],
        provider=request.provider,
    )


def _screen(request, state, size, candidates, reporter) -> list[Candidate]:
    settings = _data_settings(request)
    measure = request.space.measure
    context = ScreenContext(
        request.model, settings, settings.scorer(request.model), request.target,
        measure["shape"], measure["latency_runs"], size.num_blocks,
        request.output / "candidates",
    )  # fmt: skip
    original = state.get("screen", "original")
    if original is None:
        original = screen_original(context)
        state.put("screen", original, "original")
    for candidate in candidates:
        record = state.get("screen", candidate.name)
        if record is None:
            reporter.step(f"screening {candidate.name}")
            folder = request.output / "candidates" / candidate.name
            try:
                record = screen_candidate(candidate, context, original, folder, reporter)
            except LayerfuseError as exc:  # a plan this model cannot take: recorded, not fatal
                reporter.step(f"{candidate.name}: {exc}")
                record = {"error": str(exc), "meets_target": False, "score": None}
            state.put("screen", record, candidate.name)
        else:
            reporter.step(f"screening {candidate.name}: done earlier")
        candidate.results["screen"] = record
    return candidates


def _finalists(candidates: list[Candidate], count: int) -> list[Candidate]:
    """The ``count`` best-scoring candidates that meet the target (order: score, name)."""
    meeting = [c for c in candidates if c.results["screen"]["meets_target"]]
    score = lambda c: c.results["screen"]["score"]  # noqa: E731
    meeting = [c for c in meeting if score(c) is not None and math.isfinite(score(c))]
    return sorted(meeting, key=lambda c: (score(c), c.name))[:count]


def _quantized(request: OptimizeRequest, state: SearchState, candidate: Candidate) -> Path:
    """The recovered finalist quantized with ``request.quantize``, made once."""
    record = state.get("quantized", candidate.name)
    if record is None:
        from layerfuse.toolchain.quantize import quantize_model

        path = request.output / "finalists" / candidate.name / request.quantize / "model.onnx"
        quantize_model(candidate.results["recover"]["model"], path, request.quantize)
        record = {"model": str(path)}
        state.put("quantized", record, candidate.name)
    return Path(record["model"])


def _check(request: OptimizeRequest) -> str:
    task = require_manifest(request.model).task
    metric = quality_metric(task, request.data)
    request.limit.check_metric(metric)
    if request.quantize not in (None, "int4", "int8"):
        raise LayerfuseError(f"unknown --quantize '{request.quantize}' (choose int4 or int8)")
    if request.stop_after not in (None, *STAGES):
        raise LayerfuseError(f"unknown stage '{request.stop_after}' (one of {', '.join(STAGES)})")
    if request.output.exists() and not request.output.is_dir():
        raise LayerfuseError(f"output {request.output} exists and is not a folder")
    refuse_overwriting_inputs(
        model_files(request.model), [request.output / "winner" / "model.onnx"]
    )
    return metric


def _measure(request, state, models, metric, reporter) -> dict:
    measured = state.get("measure")
    if measured is None:
        measured = measure_models(
            {"original": request.model, **models}, metric=metric, data=request.data,
            measure=request.space.measure, seq_len=request.space.screen["seq_len"],
            provider=request.provider, reporter=reporter,
        )  # fmt: skip
        state.put("measure", measured)
    return measured


def optimize(request: OptimizeRequest, reporter: Reporter = SILENT) -> dict | None:
    """Run (or continue) the search; the report, or None when stopped after a stage."""
    metric = _check(request)
    size = SizeModel.read(request.model, request.space.merge["relax_ranks"])
    request.output.mkdir(parents=True, exist_ok=True)
    state = SearchState(request.output, request.key(size.fingerprint))
    if state.resumed:
        reporter.step(f"continuing the search in {request.output}")
    candidates, notes = propose(size, request.space, request.target)
    reporter.step(f"{len(candidates)} candidates: {', '.join(c.name for c in candidates)}")
    finalists, models, measured = [], {}, {}
    for stage in STAGES[:-1]:
        timer = _Timer()
        if stage == "screen":
            _screen(request, state, size, candidates, reporter)
            finalists = _finalists(candidates, request.space.finalists)
        elif stage == "recover":
            models = recover_finalists(
                request, state, finalists, _data_settings(request).scorer(request.model), reporter
            )
            if request.quantize:
                models |= {
                    f"{c.name}+{request.quantize}": _quantized(request, state, c) for c in finalists
                }
        else:
            measured = _measure(request, state, models, metric, reporter)
        if state.get("stage", stage) is None:
            state.put("stage", timer.record(), stage)
        if request.stop_after == stage:
            reporter.step(f"stopped after {stage}; run the same command again to continue")
            return None
    context = {"metric": metric, "notes": notes, "size": size, "state": state}
    return write_outcome(request, candidates, finalists, measured, context, reporter)
