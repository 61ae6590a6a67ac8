"""Quality per CPU-minute of every way to remove about a fifth of SmolLM2-135M (issue 25).

Each variant removes about the same *net* parameters (17-21%) and is recovered by ONE run
of ``layerfuse recover`` (local stage with its default settings, then global distillation),
stopped by its CPU-time budget (``TrainSettings.budget_minutes``) at 5, 15 and 30
CPU-minutes and resumed from its checkpoint, the test perplexity (merge_quality's measure,
4k test tokens) taken at each stop. Budget 0 is the compressed graph as written. CPU time
is the recovery's own user+system time (all threads): setup, local stage and distillation;
the test evaluations and a resume's reloading are not charged (see
``layerfuse/recover/budget.py``), so the checkpoints are points on one uninterrupted run.

Variants (the FF window 16-26 is the one local reconstruction repaired best):
- ``permute``: FFs 16-26 tied, permutation-aligned (``merge --blocks 16-26``);
- ``permute + relax 8`` / ``permute + relax 32``: the same with per-block rank-8/32 deltas;
- ``vanilla``: FFs 16-26 tied by plain averaging;
- ``prune``: whole blocks of lowest block influence (ShortGPT), as many as remove the
  permute merge's parameters (``prune --parameters``);
- ``hybrid``: the 4 blocks of lowest influence pruned, then FFs of original blocks 18-23 tied
  (permute) in what is left;
- ``permute (KD only)``: the permute merge distilled without the local stage (target P3).

FFN Fusion is not run: its best configuration (``ffn_fusion_cpu.md``) removes 4% of the
parameters (attention of 6 blocks), not a fifth.

    python benchmarks/quality_compute.py                      # budgets 0, 5, 15 for all
    python benchmarks/quality_compute.py --budgets 30 --variants prune,permute
    python benchmarks/quality_compute.py --write-only         # results of the arms run

Each budget of each variant is saved as it finishes; the same command continues.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import merge_quality
from common import RESULTS, WORK, exported_model, log, write_results
from local_reconstruction import merged_model

from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.progress import ConsoleReporter
from layerfuse.recover.local import LocalSettings
from layerfuse.recover.run import RecoverRequest, recover
from layerfuse.recover.trainer import TrainSettings

MODEL = "smollm2-135m"
TEST_TOKENS = 4096
WINDOW = (16, 26)
HYBRID_PRUNED, HYBRID_WINDOW = 4, (18, 23)
# Distillation as local_reconstruction.py runs it; the schedule is laid out over 200 steps
# (more than 30 CPU-minutes hold), so the budget, not the step count, ends every segment.
KD = TrainSettings(
    steps=200, batch_size=4, grad_accum=1, seq_len=128, lr=2e-4, warmup=2,
    eval_every=0, patience=0, valid_tokens=512, seed=0,
)  # fmt: skip
VARIANTS = [
    "permute",
    "prune",
    "permute + relax 8",
    "permute + relax 32",
    "vanilla",
    "hybrid",
    "permute (KD only)",
]
FOLDER = WORK / "quality_compute"


def _save(model, source: Path, path: Path) -> Path:
    save_model(model, path)
    carry_manifest(source, path)
    return path


def _merged(original: Path, name: str, request: MergeRequest) -> Path:
    path = FOLDER / "models" / name / "model.onnx"
    if not path.exists():
        log(f"building {name}")
        _save(apply_plan(original, plan_merge(original, request)), original, path)
    return path


def _pruned(original: Path, name: str, request: PruneRequest) -> tuple[Path, list[int]]:
    path = FOLDER / "models" / name / "model.onnx"
    record = path.parent / "blocks.json"
    if not path.exists():
        log(f"building {name}")
        plan = plan_prune(original, request)
        _save(apply_plan(original, plan), original, path)
        record.write_text(json.dumps(plan.blocks))
    return path, json.loads(record.read_text())


def compressed(original: Path, variant: str) -> Path:
    """The variant's graph, built once into the work folder."""
    if variant in ("permute", "permute (KD only)"):
        return merged_model(original, WINDOW)
    if variant.startswith("permute + relax"):
        rank = int(variant.split()[-1])
        request = MergeRequest(ranges=[WINDOW], method="permute", relax_rank=rank)
        return _merged(original, f"relax{rank}", request)
    if variant == "vanilla":
        return _merged(original, "vanilla", MergeRequest(ranges=[WINDOW], method="vanilla"))
    if variant == "prune":
        merged = parameter_count(load_model(merged_model(original, WINDOW)))
        removed = parameter_count(load_model(original)) - merged
        return _pruned(original, "prune", PruneRequest(parameters=removed))[0]
    if variant == "hybrid":
        return _hybrid(original)
    raise SystemExit(f"unknown variant {variant}")


def _hybrid(original: Path) -> Path:
    path = FOLDER / "models" / "hybrid" / "model.onnx"
    if path.exists():
        return path
    pruned, blocks = _pruned(original, "hybrid-pruned", PruneRequest(count=HYBRID_PRUNED))
    first, last = HYBRID_WINDOW
    if any(first <= b <= last for b in blocks):
        raise SystemExit(f"hybrid: pruned blocks {blocks} overlap the FF window {first}-{last}")
    below = sum(b < first for b in blocks)
    window = (first - below, last - below)
    log(f"building hybrid: blocks {blocks} pruned, FFs {window} of the rest tied")
    plan = plan_merge(pruned, MergeRequest(ranges=[window], method="permute"))
    return _save(apply_plan(pruned, plan), original, path)


def segment(original: Path, model: Path, variant: str, budget: float, first: bool) -> dict:
    """Recover ``model`` up to ``budget`` CPU-minutes (resuming the variant's run), measure."""
    folder = FOLDER / "runs" / re.sub(r"[^A-Za-z0-9]+", "-", variant.replace(" ", ""))
    out = folder / f"budget-{budget:g}" / "model.onnx"
    local = LocalSettings(steps=0) if "KD only" in variant else LocalSettings()
    if first and (folder / "checkpoints").exists():
        shutil.rmtree(folder / "checkpoints")  # an unfinished first segment: start again
    request = RecoverRequest(
        original, model, out, settings=replace(KD, budget_minutes=budget), local=local,
        checkpoint_dir=folder / "checkpoints", resume=not first,
    )  # fmt: skip
    load, wall = os.getloadavg(), time.perf_counter()
    summary = recover(request, ConsoleReporter())
    wall = time.perf_counter() - wall
    _, value = merge_quality.quality(out, TEST_TOKENS)
    for older in folder.glob("budget-*"):
        if older != out.parent:
            shutil.rmtree(older)  # keep the disk: only the latest model of a variant stays
    sets = summary["local"].get("sets", [])
    return {
        "cpu_minutes": summary["cpu_minutes"],
        "local_cpu_minutes": summary["local_cpu_minutes"],
        "kd_cpu_minutes": summary["kd_cpu_minutes"],
        "setup_cpu_minutes": summary["setup_cpu_minutes"],
        "tokens": summary["tokens_seen"],
        "kd_steps": summary["steps_done"],
        "perplexity": value,
        "wall_minutes_segment": wall / 60,
        "load_before": list(load),
        "load_after": list(os.getloadavg()),
        "local_relative_error": [
            [s["relative_error_before"], s["relative_error_after"]] for s in sets
        ],
    }


def run_variant(original: Path, variant: str, budgets: list[float], state: dict, save) -> None:
    rows = state["rows"]
    model = compressed(original, variant)
    params = parameter_count(load_model(model))
    base = {
        "model": MODEL,
        "variant": variant,
        "params_removed": 1 - params / state["original_parameters"],
        "parameters": params,
        "original_perplexity": state["original_perplexity"],
    }
    done = {r["budget"] for r in rows if r["variant"] == variant}
    if 0 not in done:
        value = merge_quality.quality(model, TEST_TOKENS)[1]
        zero = {"cpu_minutes": 0.0, "local_cpu_minutes": 0.0, "kd_cpu_minutes": 0.0}
        rows.append({**base, "budget": 0, **zero, "tokens": 0, "perplexity": value})
        save()
    for budget in sorted(b for b in budgets if b > 0 and b not in done):
        if any(r["variant"] == variant and r["budget"] > budget for r in rows):
            continue  # a run cannot go back to a smaller budget
        first = not any(r["variant"] == variant and r["budget"] > 0 for r in rows)
        log(f"{variant}: recovering to {budget:g} CPU-minutes")
        row = {**base, "budget": budget, **segment(original, model, variant, budget, first)}
        log(
            f"{variant} at {row['cpu_minutes']:.1f} CPU-minutes: perplexity {row['perplexity']:.4g}"
        )
        rows.append(row)
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0,5,15", help="comma-separated CPU-minutes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--notes", type=Path, help="a Markdown file appended to the results")
    parser.add_argument(
        "--write-only", action="store_true", help="write the results of the arms already run"
    )
    args = parser.parse_args()
    original = exported_model(MODEL)
    FOLDER.mkdir(parents=True, exist_ok=True)
    partial = FOLDER / "partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {"rows": []}
    if "original_perplexity" not in state:
        state["original_perplexity"] = merge_quality.quality(original, TEST_TOKENS)[1]
        state["original_parameters"] = parameter_count(load_model(original))
    budgets = [float(b) for b in args.budgets.split(",")]
    for variant in [] if args.write_only else args.variants.split(","):
        try:
            run_variant(original, variant, budgets, state, lambda: _keep(partial, state))
        except Exception as exc:  # one variant's failure is a result too; the others run
            log(f"{variant} failed: {type(exc).__name__}: {exc}")
            state.setdefault("failed", {})[variant] = f"{type(exc).__name__}: {exc}"
            _keep(partial, state)
    if args.write_only:
        from quality_compute_report import report

        payload = {"model": MODEL, "test_tokens": TEST_TOKENS, "kd": asdict(KD), **state}
        payload["local"] = asdict(LocalSettings())
        notes = "" if args.notes is None else "\n" + args.notes.read_text()
        text = report(state, RESULTS / "quality_compute.png") + notes
        write_results("quality_compute", payload, text)


def _keep(partial: Path, state: dict) -> None:
    tmp = partial.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, partial)


if __name__ == "__main__":
    main()
