"""Recover each finalist within its share of the budget, and account for where time went.

A time budget is CPU time (user+system of this process, every thread: the same compute when
other jobs share the cores). Each finalist gets the budget still left divided by the
finalists still to recover, so what one leaves unspent goes to the next. Its recovery runs
in two phases through :func:`layerfuse.recover.run.recover`:

- **A**: local reconstruction (merges) and two distillation steps, timed step by step, so
  the cost of a step on *this* finalist is measured, not guessed;
- **B**: distillation from A's result until the rest of the share is spent (its setup and
  write-back estimated from A's; the learning rate's cosine fitted to that budget).

A token budget needs no timing: each finalist distils its share of the tokens in one run.
"""

from __future__ import annotations

__all__ = ["RecoverShare", "cpu_seconds", "recover_finalist"]

import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

from layerfuse.progress import Reporter
from layerfuse.recover.local import LocalSettings
from layerfuse.recover.run import RecoverRequest, recover
from layerfuse.recover.settings import TrainSettings

PROBE_STEPS = 2


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class _StepClock(Reporter):
    """Passes reports on and notes the CPU time at the start of every distillation step."""

    def __init__(self, inner: Reporter) -> None:
        self.inner, self.marks = inner, []

    def step(self, message: str) -> None:
        self.inner.step(message)

    def track(self, items, total, description):
        for item in self.inner.track(items, total, description):
            if description == "recovering":
                self.marks.append(cpu_seconds())
            yield item


@dataclass
class RecoverShare:
    """What one finalist may spend: CPU ``seconds`` or distillation ``tokens``."""

    seconds: float | None
    tokens: int | None
    space: dict
    data: str
    valid_tokens: int
    seed: int
    device: str = "cpu"


def _settings(share: RecoverShare, steps: int, **extra) -> TrainSettings:
    r = share.space
    settings = TrainSettings(
        steps=max(1, steps),
        batch_size=r["batch_size"],
        grad_accum=r["grad_accum"],
        seq_len=r["seq_len"],
        lr=r["lr"],
        warmup=max(1, min(10, steps // 10)),
        eval_every=0,
        patience=0,
        valid_tokens=share.valid_tokens,
        seed=share.seed,
    )
    names = {f.name for f in fields(TrainSettings)}
    for key, value in extra.items():
        if key in names:  # budget_minutes: only where recover's trainer has it
            setattr(settings, key, value)
    return settings


def _run(original, optimized, output, share, settings, local_steps, plan, reporter) -> dict:
    clock = _StepClock(reporter)
    start_cpu, start_wall = cpu_seconds(), time.perf_counter()
    request = RecoverRequest(
        original=Path(original),
        optimized=Path(optimized),
        output=Path(output),
        data=share.data,
        train=share.space["train"],
        plan=None if plan is None else Path(plan),
        settings=settings,
        local=LocalSettings(steps=local_steps, seed=share.seed),
        device=share.device,
    )
    summary = recover(request, clock)
    end = cpu_seconds()
    marks = clock.marks
    return {
        "cpu_seconds": end - start_cpu,
        "wall_seconds": time.perf_counter() - start_wall,
        "local_seconds": summary["local"].get("seconds", 0.0),
        "step_cpu_seconds": (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None,
        "before_steps_cpu": (marks[0] - start_cpu) if marks else None,
        "after_steps_cpu": (end - marks[-1]) if marks else None,
        "steps": summary["steps_done"],
        "tokens": summary["tokens_seen"],
        "local": [
            {k: s[k] for k in ("blocks", "relative_error_before", "relative_error_after")}
            for s in summary["local"].get("sets", [])
        ],
    }


def _phase_b_steps(share: RecoverShare, probe: dict) -> int:
    """Distillation steps the rest of the share pays for, after a fresh run's overheads."""
    step = probe["step_cpu_seconds"] or probe["cpu_seconds"]
    # The local stage is timed in wall seconds: convert with the run's own CPU/wall ratio.
    local_cpu = probe["local_seconds"] * probe["cpu_seconds"] / max(probe["wall_seconds"], 1e-9)
    overhead = probe["cpu_seconds"] - PROBE_STEPS * step - local_cpu
    left = share.seconds - probe["cpu_seconds"] - max(0.0, overhead)
    return max(0, min(int(left // step), share.space["max_steps"]))


def recover_finalist(
    original: Path, compressed: Path, plan: Path | None, folder: Path, share: RecoverShare, reporter
) -> dict:
    """Recover ``compressed`` into ``folder/model.onnx``; the record of what it spent.
    ``plan`` None: recovery finds the tied sets in the graph itself."""
    local_steps = share.space["local_steps"]
    output = folder / "model.onnx"
    if share.tokens is not None:
        per_step = share.space["batch_size"] * share.space["grad_accum"] * share.space["seq_len"]
        steps = min(max(1, share.tokens // per_step), share.space["max_steps"])
        run = _run(original, compressed, output, share, _settings(share, steps), local_steps,
                   plan, reporter)  # fmt: skip
        return {"phases": {"single": run}, **_totals([run])}
    probe_out = folder / "phase_a" / "model.onnx"
    probe = _run(original, compressed, probe_out, share, _settings(share, PROBE_STEPS),
                 local_steps, plan, reporter)  # fmt: skip
    phases = {"a": probe}
    if _phase_b_steps(share, probe) >= 1:
        # The budget, not a predicted step count, ends B, and the rate's cosine is fitted to
        # it, so the share is spent whole however the step cost drifts.
        left = (share.seconds - probe["cpu_seconds"]) / 60
        settings = _settings(share, share.space["max_steps"], budget_minutes=max(left, 1e-3))
        reporter.step(f"distilling for the {left:.1f} CPU-minutes left of the share")
        phases["b"] = _run(original, probe_out, output, share, settings, 0, plan, reporter)
        shutil.rmtree(folder / "phase_a", ignore_errors=True)
    else:
        reporter.step("the share pays for no more distillation steps; keeping phase A's result")
        _move_model(probe_out, output)
    return {"phases": phases, **_totals(list(phases.values()))}


def _move_model(source: Path, target: Path) -> None:
    from layerfuse.model.io import load_model, save_model
    from layerfuse.model.manifest import carry_manifest

    save_model(load_model(source), target)
    carry_manifest(source, target)
    shutil.rmtree(source.parent, ignore_errors=True)


def _totals(runs: list[dict]) -> dict:
    return {
        "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
        "wall_seconds": sum(r["wall_seconds"] for r in runs),
        "local_seconds": sum(r["local_seconds"] for r in runs),
        "steps": sum(r["steps"] for r in runs),
        "tokens": sum(r["tokens"] for r in runs),
    }
