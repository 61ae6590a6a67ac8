"""Distillation settings picked by quality per CPU-minute, not by habit (issue 25).

SmolLM2-135M with its 8 blocks of lowest influence pruned (21.1% of the parameters, the
``prune`` variant of ``quality_compute.py``, the best method there) is recovered for the same
5 CPU-minutes (``recover --budget-minutes 5``: setup, no local stage, distillation) under each
setting, every run fresh, and its test perplexity (4k fortunes tokens) measured:

- the learning-rate schedule: a cosine laid over 200 steps that the budget cuts short (how
  ``quality_compute.py``'s stops ran) against one fitted to the budget (``--schedule auto``);
- the peak learning rate: 1e-4, 2e-4, 5e-4, 1e-3;
- the tokens of a step: 4 x 128, 2 x 128, 4 x 64, 8 x 128 (more steps of fewer tokens, or
  fewer of more).

    python benchmarks/recovery_settings.py [--budget 5] [--settings "NAME;NAME"]

Each run is saved as it finishes (``runs/bench/recovery_settings/partial.json``); the same
command continues. Writes ``benchmarks/results/recovery_settings.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace

import merge_quality
import quality_compute
from common import RESULTS, WORK, exported_model, log, markdown_table, write_results

from layerfuse.progress import ConsoleReporter
from layerfuse.recover.local import LocalSettings
from layerfuse.recover.run import RecoverRequest, recover

FOLDER = WORK / "recovery_settings"
BASE = replace(quality_compute.KD, steps=10_000, schedule="auto")
SETTINGS = {
    "steps schedule (200), lr 2e-4, 4x128": replace(BASE, steps=200, schedule="steps"),
    "fitted, lr 2e-4, 4x128": BASE,
    "fitted, lr 1e-4, 4x128": replace(BASE, lr=1e-4),
    "fitted, lr 5e-4, 4x128": replace(BASE, lr=5e-4),
    "fitted, lr 1e-3, 4x128": replace(BASE, lr=1e-3),
    "fitted, lr 2e-4, 2x128": replace(BASE, batch_size=2),
    "fitted, lr 2e-4, 4x64": replace(BASE, seq_len=64),
    "fitted, lr 2e-4, 8x128": replace(BASE, batch_size=8),
}


def run(name: str, budget: float) -> dict:
    study = quality_compute.STUDIES["smollm2-135m"]
    original = exported_model(study.model)
    model = quality_compute.compressed(study, original, "prune")
    slug = "".join(c if c.isalnum() else "-" for c in name)
    out = FOLDER / f"budget-{budget:g}" / slug / "model.onnx"
    settings = replace(SETTINGS[name], budget_minutes=budget)
    load, wall = os.getloadavg(), time.perf_counter()
    request = RecoverRequest(original, model, out, settings=settings, local=LocalSettings(steps=0))
    summary = recover(request, ConsoleReporter())
    return {
        "setting": name,
        "settings": asdict(settings),
        "budget": budget,
        "cpu_minutes": summary["cpu_minutes"],
        "kd_cpu_minutes": summary["kd_cpu_minutes"],
        "steps": summary["steps_done"],
        "tokens": summary["tokens_seen"],
        "last_lr": summary["last_lr"],
        "perplexity": merge_quality.quality(out, quality_compute.TEST_TOKENS)[1],
        "wall_minutes": (time.perf_counter() - wall) / 60,
        "load_before": list(load),
        "load_after": list(os.getloadavg()),
    }


def _notes(results: dict) -> str:
    """What the table means, with quality_compute's earlier run of the same pruned model."""
    earlier = {r["budget"]: r["perplexity"] for r in results["earlier_prune_rows"]}
    return (
        "\nEach row is one seeded run. Steps per CPU-minute vary with the load (10 to 20 steps "
        "of the same shape in 5 CPU-minutes: a contended core does less per CPU-second), so "
        "differences of a few percent are within that noise; 5e-4's lead over the other rates "
        "(6-14%) is larger. The fitted schedule alone gains little at 5 CPU-minutes (131.1 vs "
        "132.8 at 2e-4): the rate that matters is the peak, and a cosine fitted to the budget "
        "is what lets a higher peak anneal in time. For comparison, `quality_compute.py`'s "
        "pruning run (step schedule, 2e-4) read "
        + ", ".join(f"{earlier[b]:.1f} at {b:g}" for b in sorted(earlier) if b)
        + " CPU-minutes. `recover`'s defaults are now the best row's: peak 5e-4, 4 x 128 "
        "tokens a step, the cosine fitted to `--budget-minutes`.\n"
    )


def markdown(results: dict) -> str:
    rows = sorted(results["rows"], key=lambda r: (r["budget"], r["perplexity"]))
    table = markdown_table(
        ["budget", "setting", "CPU min", "steps", "tokens", "lr at the end", "test perplexity"],
        [
            [f"{r['budget']:g}", r["setting"], f"{r['cpu_minutes']:.1f}", r["steps"],
             f"{r['tokens']:,}", f"{r['last_lr']:.2g}", f"{r['perplexity']:.1f}"]
            for r in rows
        ],
    )  # fmt: skip
    return (
        "# Distillation settings by quality per CPU-minute (issue 25)\n\n"
        f"SmolLM2-135M, 8 blocks of lowest influence pruned (21.1% removed; "
        f"{results['compressed_perplexity']:.1f} before recovery, original "
        f"{results['original_perplexity']:.2f}), each run fresh with its budget of CPU-minutes "
        "(user+system of the run; setup included). 2 CPU "
        "cores shared with other jobs (load in the JSON); the budget is CPU time, so the "
        "compute is the same.\n\n"
        f"{table}\n{_notes(results)}\nRegenerate: `python benchmarks/recovery_settings.py "
        "--budget 5` (every setting), then `--budget 15 --settings NAME;NAME` for the ones "
        "run longer.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=5.0, help="CPU-minutes per run")
    parser.add_argument("--settings", help="names from SETTINGS, ';'-separated (default: all)")
    args = parser.parse_args()
    chosen = args.settings.split(";") if args.settings else list(SETTINGS)
    unknown = [name for name in chosen if name not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    FOLDER.mkdir(parents=True, exist_ok=True)
    partial = FOLDER / f"partial-{args.budget:g}.json"
    rows = json.loads(partial.read_text()) if partial.exists() else []
    for name in chosen:
        if any(r["setting"] == name for r in rows):
            continue
        log(f"{name}: {args.budget:g} CPU-minutes")
        rows.append(run(name, args.budget))
        log(f"{name}: perplexity {rows[-1]['perplexity']:.1f}")
        partial.write_text(json.dumps(rows, indent=1))
    study = quality_compute.STUDIES["smollm2-135m"]
    committed = json.loads((RESULTS / "quality_compute.json").read_text())
    zero = next(r for r in committed["rows"] if r["variant"] == "prune" and r["budget"] == 0)
    every = [
        row
        for path in sorted(FOLDER.glob("partial-*.json"))
        for row in json.loads(path.read_text())
    ]
    results = {
        "model": study.model,
        "original_perplexity": zero["original_perplexity"],
        "compressed_perplexity": zero["perplexity"],
        "earlier_prune_rows": [r for r in committed["rows"] if r["variant"] == "prune"],
        "rows": every,
    }
    write_results("recovery_settings", results, markdown(results))


if __name__ == "__main__":
    main()
