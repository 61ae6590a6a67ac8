"""Recovery training: every compression of SmolLM2-135M trained back with one budget (issue 12).

SmolLM2-135M, about a fifth of the parameters removed, each variant distilled from the
original graph (KL to its logits, all weights trained) with the SAME budget (steps, batch,
tokens, learning-rate schedule, validation), then measured on the test split like
``merge_quality.py`` (128-token windows, 4k tokens instead of 16k):

- 1/3 of the FFs merged: vanilla (window 17-27), permute (16-26), permute + least-squares
  refit (16-26): the windows ``merge_quality.py`` chose by sliding search;
- whole blocks pruned at the same budget (blocks ``prune_vs_merge.py`` chose by influence);
- FFN Fusion, the best configuration of ``ffn_fusion.py``: attention of blocks 4-9 removed,
  FFNs of blocks 3-8 fused.

And MiniLM-L6 with 1/2 of its FFs merged (permute, window 2-5), distilled on
``last_hidden_state``, scored by topic accuracy.

Each variant's result is saved as it finishes and training checkpoints as it goes, so an
interrupted run continues where it stopped (run the same command again).

    python benchmarks/recovery.py                       # about an hour on 2 CPU cores
    python benchmarks/recovery.py --steps 10 --tag smoke  # a quick check of the pipeline
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import merge_quality
from common import RESULTS, WORK, exported_model, log, write_results
from merge_quality import CALIB_TOKENS, VALID_TOKENS, choose_refit
from recovery_report import markdown, plot, targets

from layerfuse.data.batches import make_batches
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PrunePlan
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import ConsoleReporter
from layerfuse.recover.run import RecoverRequest, recover
from layerfuse.recover.settings import TrainSettings
from layerfuse.runtime.quality import perplexity
from layerfuse.runtime.session import create_session

# One budget for every SmolLM2 variant, sized for 2 CPU cores shared with other jobs (about a
# third of them were free when the committed numbers were measured, and one step of 4 x 128
# tokens took about a minute): 10 steps of 4 x 64 tokens (2,560 tokens), AdamW peak lr 2e-4
# after 2 warm-up steps, cosine to 10%; validation on 512 tokens every 2 steps, no early
# stopping (every variant trains the same steps). Raise --steps on a free machine or a GPU.
SMOLLM2 = TrainSettings(
    steps=10, batch_size=4, grad_accum=1, seq_len=64, lr=2e-4, warmup=2,
    eval_every=2, patience=0, valid_tokens=512, seed=0,
)  # fmt: skip
MINILM = TrainSettings(
    steps=10, batch_size=16, grad_accum=1, seq_len=64, lr=2e-4, warmup=2,
    eval_every=2, patience=0, valid_tokens=1024, seed=0,
)  # fmt: skip
# Test tokens for perplexity (merge_quality.py uses 16k; 4k keeps the six evaluations short).
TEST_TOKENS = 4096
MERGE_DATA = DataSettings(calib_tokens=CALIB_TOKENS, valid_tokens=VALID_TOKENS, provider="cpu")
PRUNED_BLOCKS = [12, 13, 14, 15, 16, 17, 25, 26]


def merge_plan(original: Path, window: tuple[int, int], method: str, refit: bool):
    plan = plan_merge(original, MergeRequest(ranges=[window], method=method, data=MERGE_DATA))
    if refit:
        calibration = make_batches(original, "fortunes", "calib", tokens=CALIB_TOKENS)
        valid = make_batches(original, "fortunes", "valid", tokens=VALID_TOKENS)
        choose_refit(original, plan, calibration, CandidateScorer(original, valid, provider="cpu"))
    return plan


def structural_plan(original: Path, kind: str):
    model = load_model(original)
    fp, blocks = fingerprint(model), 30
    if kind == "prune":
        return PrunePlan(fp, blocks, "block", PRUNED_BLOCKS)
    return FusePlan(fp, blocks, list(range(4, 10)), [(3, 8)])


VARIANTS = {
    "smollm2-135m": {
        "merge permute": lambda o: merge_plan(o, (16, 26), "permute", False),
        "merge vanilla": lambda o: merge_plan(o, (17, 27), "vanilla", False),
        "prune blocks": lambda o: structural_plan(o, "prune"),
        "merge permute + refit": lambda o: merge_plan(o, (16, 26), "permute", True),
        "ffn fusion": lambda o: structural_plan(o, "fuse"),
    },
    "minilm-l6": {"merge permute 1/2": lambda o: merge_plan(o, (2, 5), "permute", False)},
}


VARIANTS_BY_NAME = {name: build for family in VARIANTS.values() for name, build in family.items()}


def build_variant(original: Path, model: str, name: str) -> Path:
    """The optimized graph and its plan, built once and shared by every run of this script."""
    path = WORK / "recovery" / "variants" / model / _slug(name) / "model.onnx"
    if not path.exists():
        log(f"building {name}")
        plan = VARIANTS_BY_NAME[name](original)
        plan.save(path.with_name("plan.json"))
        save_model(apply_plan(original, plan), path)
        carry_manifest(original, path)
    return path


def quality(path: Path) -> tuple[str, float]:
    """merge_quality's measure on this benchmark's smaller test budget."""
    return merge_quality.quality(path, TEST_TOKENS)


def _slug(name: str) -> str:
    return name.replace(" + ", "+").replace(" ", "_").replace("/", "_")


def valid_perplexity(path: Path, settings: TrainSettings) -> float:
    """The original's score on the validation batches training is judged on."""
    batches = make_batches(
        path, "fortunes", "valid", tokens=settings.valid_tokens, seq_len=settings.seq_len,
        batch_size=settings.batch_size,
    )  # fmt: skip
    return perplexity(create_session(path, provider="cpu"), batches)


def run_variant(model: str, original: Path, name: str, settings: TrainSettings, tag: str):
    path = build_variant(original, model, name)
    folder = WORK / "recovery" / tag / model / _slug(name)
    metric, before = quality(path)
    log(f"{model} {name}: {metric} {before:.4g} after surgery; training")
    checkpoints = folder / "checkpoints"
    started = time.perf_counter()
    summary = recover(
        RecoverRequest(
            original, path, folder / "recovered.onnx", plan=path.with_name("plan.json"),
            settings=settings, checkpoint_dir=checkpoints,
            resume=(checkpoints / "state.pt").exists(),
        ),
        ConsoleReporter(),
    )  # fmt: skip
    _, after = quality(folder / "recovered.onnx")
    log(f"{model} {name}: {metric} {before:.4g} -> {after:.4g}")
    return {
        "model": model,
        "variant": name,
        "parameters": parameter_count(load_model(path)),
        "metric": metric,
        "after_surgery": before,
        "after_recovery": after,
        "train_seconds_this_run": time.perf_counter() - started,
        "training": {k: v for k, v in summary.items() if k != "output"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--steps", type=int, help="override the step budget (smoke tests)")
    parser.add_argument("--variants", help="comma-separated subset of the variants (smoke tests)")
    parser.add_argument("--tag", default="full", help="work folder and partial-result name")
    parser.add_argument(
        "--results",
        help="write benchmarks/results/NAME.{json,md,png} (default: recovery for --tag full)",
    )
    args = parser.parse_args()
    results = args.results or ("recovery" if args.tag == "full" else None)
    budgets = {"smollm2-135m": SMOLLM2, "minilm-l6": MINILM}
    if args.steps:
        budgets = {k: replace(v, steps=args.steps) for k, v in budgets.items()}
    partial = WORK / "recovery" / args.tag / "partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(partial.read_text()) if partial.exists() else []
    for model in args.models.split(","):
        original = exported_model(model)
        if not any(r["model"] == model and r["variant"] == "original" for r in rows):
            metric, value = quality(original)
            row = {"model": model, "variant": "original", "metric": metric}
            row |= {"parameters": parameter_count(load_model(original)), "after_surgery": value}
            row |= {"after_recovery": value}
            if metric == "perplexity":
                row["valid_perplexity"] = valid_perplexity(original, budgets[model])
            rows.append(row)
        chosen = args.variants.split(",") if args.variants else VARIANTS[model]
        for name in (n for n in VARIANTS[model] if n in chosen):
            if any(r["model"] == model and r["variant"] == name for r in rows):
                continue
            rows.append(run_variant(model, original, name, budgets[model], args.tag))
            partial.write_text(json.dumps(rows, indent=1))
    partial.write_text(json.dumps(rows, indent=1))
    if results is None:
        return
    plot(rows, RESULTS / f"{results}.png")
    settings = {k: asdict(v) for k, v in budgets.items()}
    payload = {"budgets": settings, "test_tokens": TEST_TOKENS, "targets": targets(rows)}
    report = markdown(rows, settings, VARIANTS, results)
    write_results(results, payload | {"rows": rows}, report)


if __name__ == "__main__":
    main()
