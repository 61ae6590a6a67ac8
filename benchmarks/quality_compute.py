"""Quality per CPU-minute of every way to remove about a fifth of SmolLM2-135M (issue 25).

Each variant removes about the same *net* parameters (17-21%) and is recovered by ONE run
of ``layerfuse recover`` (local stage, then distillation) stopped by its CPU-time budget at
5, 15 and 30 CPU-minutes and resumed, the test perplexity (4k tokens) taken and saved at
each stop (the same command continues); budget 0 is the graph as written. CPU time is the
recovery's own (all threads; tests and reloading not charged). The ``-fitted`` arm runs
recover's current defaults instead: one run per budget, its schedule fitted to it.

Variants (the FF window 16-26 is the one local reconstruction repaired best):
- ``permute``: FFs 16-26 tied, permutation-aligned (``merge --blocks 16-26``);
- ``permute + relax 8`` / ``permute + relax 32``: the same with per-block rank-8/32 deltas;
- ``vanilla``: FFs 16-26 tied by plain averaging;
- ``prune``: blocks of lowest influence (ShortGPT) removing the merge's parameters;
  ``prune as V``: the same removing variant V's net parameters (a relaxed tie removes fewer);
- ``hybrid``: the 4 blocks of lowest influence pruned, then FFs 18-23 tied (permute);
- ``permute (KD only)``: the permute merge distilled without the local stage (target P3);
- ``X (touched)``: X trained with ``--train touched`` (the changed blocks and neighbours);
- ``fusion``: FFN Fusion's best configuration (``ffn_fusion_cpu.md``), 4% removed.

``--model minilm-l6``: MiniLM-L6, FFs 2-5 tied (15.7%) against 2 of 6 blocks pruned, topic
accuracy (ridge probe) at 0, 1, 5 and 15 CPU-minutes, into ``quality_compute_minilm.*``.

    python benchmarks/quality_compute.py                      # budgets 0, 5, 15 for all
    python benchmarks/quality_compute.py --budgets 30 --variants prune,permute
    python benchmarks/quality_compute.py --model smollm2-135m-fitted  # at recover's defaults
    python benchmarks/quality_compute.py [--model M] --write-only   # results of the arms run
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
from common import RESULTS, exported_model, log, notes_section, write_results
from quality_compute_studies import STUDIES, Study

from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.fuse import FuseRequest, plan_fuse
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.progress import ConsoleReporter
from layerfuse.recover.local import LocalSettings
from layerfuse.recover.run import RecoverRequest, recover

TEST_TOKENS = 4096
HYBRID_PRUNED, HYBRID_WINDOW = 4, (18, 23)
PRUNE_AS = "prune as "  # "prune as V": pruning removing V's net parameters ("prune": the permute's)


def _slug(text: str) -> str:
    """``text`` as a folder name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text)


def _save(model, source: Path, path: Path) -> Path:
    save_model(model, path)
    carry_manifest(source, path)
    return path


def _built(study: Study, original: Path, name: str, request: MergeRequest | FuseRequest) -> Path:
    path = study.folder / "models" / name / "model.onnx"
    if not path.exists():
        log(f"building {name}")
        planner = plan_merge if isinstance(request, MergeRequest) else plan_fuse
        _save(apply_plan(original, planner(original, request)), original, path)
    return path


def _pruned(
    study: Study, original: Path, name: str, request: PruneRequest
) -> tuple[Path, list[int]]:
    path = study.folder / "models" / name / "model.onnx"
    record = path.parent / "blocks.json"
    if not path.exists():
        log(f"building {name}")
        plan = plan_prune(original, request)
        _save(apply_plan(original, plan), original, path)
        record.write_text(json.dumps(plan.blocks))
    return path, json.loads(record.read_text())


def compressed(study: Study, original: Path, variant: str) -> Path:
    """The variant's graph, built once into the study's work folder."""
    variant = variant.removesuffix(" (touched)")  # the same graph, trained differently
    window = [study.window]
    if variant in ("permute", "permute (KD only)"):
        return _built(study, original, "permute", MergeRequest(ranges=window, method="permute"))
    if variant.startswith("permute + relax"):
        rank = int(variant.split()[-1])
        request = MergeRequest(ranges=window, method="permute", relax_rank=rank)
        return _built(study, original, f"relax{rank}", request)
    if variant == "vanilla":
        request = MergeRequest(ranges=window, method="vanilla")
        return _built(study, original, "vanilla", request)
    if variant == "prune" or variant.startswith(PRUNE_AS):
        match = variant.removeprefix(PRUNE_AS) if variant != "prune" else "permute"
        merged = parameter_count(load_model(compressed(study, original, match)))
        removed = parameter_count(load_model(original)) - merged
        return _pruned(study, original, _slug(variant), PruneRequest(parameters=removed))[0]
    if variant == "hybrid":
        return _hybrid(study, original)
    if variant == "fusion":  # ffn_fusion_cpu.md's best: attention of 4-9 removed, FFs 3-8 fused
        request = FuseRequest(drop_attention=list(range(4, 10)), fuse=[(3, 9)])
        return _built(study, original, "fusion", request)
    raise SystemExit(f"unknown variant {variant}")


def _hybrid(study: Study, original: Path) -> Path:
    path = study.folder / "models" / "hybrid" / "model.onnx"
    if path.exists():
        return path
    request = PruneRequest(count=HYBRID_PRUNED)
    pruned, blocks = _pruned(study, original, "hybrid-pruned", request)
    first, last = HYBRID_WINDOW
    if any(first <= b <= last for b in blocks):
        raise SystemExit(f"hybrid: pruned blocks {blocks} overlap the FF window {first}-{last}")
    below = sum(b < first for b in blocks)
    window = (first - below, last - below)
    log(f"building hybrid: blocks {blocks} pruned, FFs {window} of the rest tied")
    plan = plan_merge(pruned, MergeRequest(ranges=[window], method="permute"))
    return _save(apply_plan(pruned, plan), original, path)


def _run_folder(study: Study, variant: str) -> Path:
    return study.folder / "runs" / _slug(variant.replace(" ", ""))


def segment(study: Study, original: Path, model: Path, variant: str, budget: float) -> dict:
    """Recover ``model`` up to ``budget`` CPU-minutes (resuming the variant's run), measure.

    A variant whose checkpoint is gone starts again: a fresh run to this budget is the same
    run (the schedule counts steps, not budgets); see ``Study.run_per_budget``."""
    folder = _run_folder(study, variant)
    if study.run_per_budget:
        folder = folder / f"run-{budget:g}"
    out = folder / f"budget-{budget:g}" / "model.onnx"
    # The encoder arm measures the local stage too (recover skips it on encoders by default).
    local = LocalSettings(steps=0) if "KD only" in variant else LocalSettings(encoders="run")
    resume = (folder / "checkpoints" / "state.pt").exists()
    request = RecoverRequest(
        original, model, out, settings=replace(study.kd, budget_minutes=budget), local=local,
        checkpoint_dir=folder / "checkpoints", resume=resume,
        train="touched" if variant.endswith("(touched)") else "all",
    )  # fmt: skip
    load, wall = os.getloadavg(), time.perf_counter()
    summary = recover(request, ConsoleReporter())
    wall = time.perf_counter() - wall
    _, value = merge_quality.quality(out, TEST_TOKENS)
    for older in folder.glob("budget-*"):
        if older != out.parent:
            shutil.rmtree(older)  # keep the disk: only the latest model of a variant stays
    if study.run_per_budget:
        shutil.rmtree(folder / "checkpoints")  # a finished fitted run is never resumed
    sets = summary["local"].get("sets", [])
    return {
        "cpu_minutes": summary["cpu_minutes"],
        "local_cpu_minutes": summary["local_cpu_minutes"],
        "kd_cpu_minutes": summary["kd_cpu_minutes"],
        "setup_cpu_minutes": summary["setup_cpu_minutes"],
        "tokens": summary["tokens_seen"],
        "kd_steps": summary["steps_done"],
        study.metric: value,
        "wall_minutes_segment": wall / 60,
        "load_before": list(load),
        "load_after": list(os.getloadavg()),
        "local_relative_error": [
            [s["relative_error_before"], s["relative_error_after"]] for s in sets
        ],
    }


def run_variant(study: Study, original: Path, variant: str, budgets: list[float], state, save):
    rows, metric = state["rows"], study.metric
    model = compressed(study, original, variant)
    params = parameter_count(load_model(model))
    base = {
        "model": study.model,
        "variant": variant,
        "params_removed": 1 - params / state["original_parameters"],
        "parameters": params,
        f"original_{metric}": state[f"original_{metric}"],
    }
    done = {r["budget"] for r in rows if r["variant"] == variant}
    if 0 not in done:
        value = merge_quality.quality(model, TEST_TOKENS)[1]
        zero = {"cpu_minutes": 0.0, "local_cpu_minutes": 0.0, "kd_cpu_minutes": 0.0}
        rows.append({**base, "budget": 0, **zero, "tokens": 0, metric: value})
        save()
    for budget in sorted(b for b in budgets if b > 0 and b not in done):
        later = any(r["variant"] == variant and r["budget"] > budget for r in rows)
        if later and not study.run_per_budget:
            continue  # a run cannot go back to a smaller budget
        log(f"{variant}: recovering to {budget:g} CPU-minutes")
        row = {**base, "budget": budget, **segment(study, original, model, variant, budget)}
        log(f"{variant} at {row['cpu_minutes']:.1f} CPU-minutes: {metric} {row[metric]:.4g}")
        rows.append(row)
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(STUDIES), default="smollm2-135m")
    parser.add_argument("--budgets", help="comma-separated CPU-minutes (default: the model's)")
    parser.add_argument("--variants", help="comma-separated (default: all of the model's)")
    parser.add_argument(
        "--notes", type=Path, help="a Markdown file of notes (default: keep the results' own)"
    )
    parser.add_argument(
        "--write-only", action="store_true", help="write the results of the arms already run"
    )
    args = parser.parse_args()
    study = STUDIES[args.model]
    original = exported_model(study.model)
    study.folder.mkdir(parents=True, exist_ok=True)
    partial = study.folder / "partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {"rows": []}
    if "original_parameters" not in state:
        state[f"original_{study.metric}"] = merge_quality.quality(original, TEST_TOKENS)[1]
        state["original_parameters"] = parameter_count(load_model(original))
    budgets = [float(b) for b in (args.budgets or study.budgets).split(",")]
    variants = args.variants.split(",") if args.variants else study.variants
    for variant in [] if args.write_only else variants:
        try:
            run_variant(study, original, variant, budgets, state, lambda: _keep(partial, state))
        except Exception as exc:  # one variant's failure is a result too; the others run
            log(f"{variant} failed: {type(exc).__name__}: {exc}")
            state.setdefault("failed", {})[variant] = f"{type(exc).__name__}: {exc}"
            _keep(partial, state)
    if args.write_only:
        _write(study, args.model, state, args.notes)


def _write(study: Study, key: str, state: dict, notes: Path | None) -> None:
    from quality_compute_report import report

    payload = {"model": study.model, "test_tokens": TEST_TOKENS, "kd": asdict(study.kd), **state}
    payload["local"] = asdict(LocalSettings(encoders="run"))
    text = report(study, state, RESULTS / f"{study.results}.png", key)
    text += notes_section(study.results, notes)
    write_results(study.results, payload, text)


def _keep(partial: Path, state: dict) -> None:
    """Save ``state``, keeping rows another run of the script saved meanwhile (two variants
    may run side by side, each holding the file's state as it was when it started)."""
    if partial.exists():
        mine = {(r["variant"], r["budget"]) for r in state["rows"]}
        theirs = json.loads(partial.read_text())["rows"]
        state["rows"] += [r for r in theirs if (r["variant"], r["budget"]) not in mine]
    tmp = partial.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, partial)


if __name__ == "__main__":
    main()
