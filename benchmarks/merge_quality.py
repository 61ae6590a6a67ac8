"""Quality of aligned FF merging on real models, like the paper's table (issue 4).

For SmolLM2-135M (perplexity on held-out fortunes text) and MiniLM-L6 (topic accuracy):
the original graph, then 1/3, 1/2 and all-but-one of the FF sublayers merged, each with the
vanilla (no permutation) and permute (aligned) methods, each with and without the
least-squares refit of the shared down-projection (shrinkage toward the averaged weights
chosen on the validation split). Windows are chosen by sliding over the model and scoring
on the validation split; reported numbers use the test split.

    python benchmarks/merge_quality.py            # both models (about 45 min on 2 CPU cores)
    python benchmarks/merge_quality.py --models minilm-l6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import (
    RESULTS,
    WORK,
    exported_model,
    log,
    markdown_table,
    plot_quality_vs_removed,
    write_results,
)

from layerfuse.data.batches import make_batches
from layerfuse.model.io import file_bytes, load_model, save_model
from layerfuse.model.manifest import carry_manifest, require_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.merge.refit import choose_shrinkage, refit_systems
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.runtime.evaluate import topic_accuracy
from layerfuse.runtime.quality import perplexity
from layerfuse.runtime.session import create_session

RATIOS = ("1/3", "1/2", "all-but-one")
METHODS = ("vanilla", "permute")
CALIB_TOKENS = 10240
VALID_TOKENS = 4096
TEST_TOKENS = 16384


def quality(path: Path, tokens: int = TEST_TOKENS) -> tuple[str, float]:
    """Test perplexity on ``tokens`` in 128-token windows, or MiniLM's topic accuracy."""
    manifest = require_manifest(path)
    session = create_session(path, provider="cpu")
    if manifest.task == "causal-lm":
        batches = make_batches(path, "fortunes", "test", tokens=tokens, seq_len=128)
        return "perplexity", perplexity(session, batches)
    return "topic_accuracy", topic_accuracy(session, path.parent / manifest.tokenizer)


def variant_row(
    model: str, original: Path, plan, ratio: str, refit: bool, folder: Path, total: int
) -> dict:
    path = folder / "model.onnx"
    save_model(apply_plan(original, plan), path)
    carry_manifest(original, path)
    plan.save(folder / "plan.json")
    metric, value = quality(path)
    window = plan.windows[0]
    return {
        "model": model,
        "ratio": ratio,
        "method": plan.method,
        "refit": refit,
        "window": [window.blocks[0], window.blocks[-1]],
        "ff_merged": len(window.blocks),
        "parameters_removed": plan.parameters_removed,
        "parameters_removed_pct": 100.0 * plan.parameters_removed / total,
        "file_bytes": file_bytes(path),
        "metric": metric,
        "value": value,
        "selection": plan.selection,
    }


def run_model(model: str, rows: list[dict], done: set) -> None:
    original = exported_model(model)
    structure = detect_structure(load_model(original))
    total = structure.parameter_count
    if (model, "original") not in done:
        metric, value = quality(original)
        rows.append(
            {
                "model": model,
                "ratio": "0",
                "method": "original",
                "refit": False,
                "window": None,
                "ff_merged": 0,
                "parameters_removed": 0,
                "parameters_removed_pct": 0.0,
                "file_bytes": file_bytes(original),
                "metric": metric,
                "value": value,
            }
        )
        log(f"{model} original: {metric} {value:.4g}")
    calibration = make_batches(original, "fortunes", "calib", tokens=CALIB_TOKENS, seq_len=128)
    valid = make_batches(original, "fortunes", "valid", tokens=VALID_TOKENS, seq_len=128)
    scorer = CandidateScorer(original, valid, provider="cpu")
    for ratio in RATIOS:
        for method in METHODS:
            key = (model, ratio, method)
            if key in done:
                continue
            log(f"{model}: planning {ratio} {method}")
            request = MergeRequest(
                ratio=ratio,
                method=method,
                data=DataSettings(
                    calib_tokens=CALIB_TOKENS, valid_tokens=VALID_TOKENS, provider="cpu"
                ),
                memory_budget_bytes=6 * 1024**3,
            )
            plan = plan_merge(original, request)
            folder = WORK / "merge" / model / f"{ratio.replace('/', '_')}-{method}"
            rows.append(variant_row(model, original, plan, ratio, False, folder, total))
            log(f"  {rows[-1]['metric']} {rows[-1]['value']:.4g} window {rows[-1]['window']}")
            choose_refit(original, plan, calibration, scorer)
            refit_folder = folder.with_name(folder.name + "-refit")
            rows.append(variant_row(model, original, plan, ratio, True, refit_folder, total))
            rows[-1]["refit_choice"] = plan.refit
            log(
                f"  refit: {rows[-1]['metric']} {rows[-1]['value']:.4g} "
                f"(shrinkage {plan.refit['shrinkage']:g})"
            )
            save_checkpoint(rows)


def choose_refit(original: Path, plan, calibration: list, scorer: CandidateScorer) -> None:
    """Refit with the shrinkage that scores best on validation (always applied, so the table
    shows what refit does even where the merge command's guard would drop it)."""
    systems = refit_systems(original, plan, calibration, provider="cpu")
    plan.refit = choose_shrinkage(original, plan, systems, scorer)


def save_checkpoint(rows: list[dict]) -> None:
    checkpoint = WORK / "merge_quality.partial.json"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text(json.dumps(rows, indent=1))


def markdown(rows: list[dict]) -> str:
    out = [
        "# Aligned FF merging: quality vs parameters removed\n",
        "Windows chosen by sliding over the model (validation split); numbers on the test "
        "split. No training: `refit` is the least-squares refit of the shared "
        "down-projection.\n",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        out.append(f"\n## {model}\n")
        table = []
        for r in own:
            window = "-" if r["window"] is None else f"{r['window'][0]}-{r['window'][1]}"
            table.append(
                [
                    r["ratio"],
                    r["method"],
                    "yes" if r["refit"] else "no",
                    window,
                    f"{r['parameters_removed_pct']:.1f}%",
                    f"{r['file_bytes'] / 2**20:.1f} MiB",
                    f"{r['value']:.4g}",
                ]
            )
        out.append(
            markdown_table(
                [
                    "FFs merged",
                    "method",
                    "refit",
                    "window",
                    "params removed",
                    "file",
                    own[0]["metric"].replace("_", " "),
                ],
                table,
            )
        )
    out.append("\n![quality vs parameters removed](merge_quality.png)\n")
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = parser.parse_args()
    rows: list[dict] = []
    checkpoint = WORK / "merge_quality.partial.json"
    if args.resume and checkpoint.exists():
        rows = json.loads(checkpoint.read_text())
    done = {(r["model"], r["ratio"], r["method"]) for r in rows if r["refit"]} | {
        (r["model"], "original") for r in rows if r["method"] == "original"
    }
    for model in args.models.split(","):
        run_model(model, rows, done)
    plot_quality_vs_removed(
        rows,
        RESULTS / "merge_quality.png",
        lambda r: r["method"] + (" + refit" if r["refit"] else ""),
    )
    write_results("merge_quality", {"rows": rows}, markdown(rows))


if __name__ == "__main__":
    main()
