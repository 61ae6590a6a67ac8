"""Layer pruning vs FF merging at the same parameter budgets, and CKA heatmaps (issue 6).

For each budget that a merge variant in ``results/merge_quality.json`` removes (1/3, 1/2,
all-but-one of the FF sublayers), prune the same number of parameters:

- whole blocks chosen by block influence (ShortGPT) and by a sliding window on validation;
- FF sublayers only (the exact FF budget of the merge) chosen by influence and by sliding.

Quality uses the same test data as the merge benchmark, so the rows are comparable. CKA
matrices of FF outputs and of attention outputs are computed for both models.

    python benchmarks/merge_quality.py && python benchmarks/prune_vs_merge.py
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import (
    RESULTS,
    WORK,
    exported_model,
    log,
    markdown_table,
    plot_quality_vs_removed,
    write_results,
)
from merge_quality import RATIOS, quality

from layerfuse.data.batches import make_batches
from layerfuse.model.io import file_bytes, load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.passes.similarity import sublayer_cka
from layerfuse.reports.plots import heatmap

PRUNING = (("block", "influence"), ("block", "sliding"), ("ff", "influence"), ("ff", "sliding"))
CKA_TOKENS = 4096


def merge_rows(model: str) -> list[dict]:
    source = RESULTS / "merge_quality.json"
    if not source.exists():
        raise SystemExit("run benchmarks/merge_quality.py first (its budgets are matched here)")
    return [r for r in json.loads(source.read_text())["rows"] if r["model"] == model]


def prune_rows(model: str, merges: list[dict]) -> list[dict]:
    original = exported_model(model)
    structure = detect_structure(load_model(original))
    total = structure.parameter_count
    ff_parameters = structure.blocks[0].ff.parameter_count
    rows = []
    budgets = sorted(
        {(r["ratio"], r["parameters_removed"]) for r in merges if r["ratio"] != "0"},
        key=lambda budget: budget[1],
    )
    for ratio, budget in budgets:
        for target, select in PRUNING:
            request = PruneRequest(
                target=target,
                count=round(budget / ff_parameters) if target == "ff" else None,
                parameters=budget if target == "block" else None,
                select=select,
                data=DataSettings(provider="cpu"),
            )
            plan = plan_prune(original, request)
            path = (
                WORK
                / "prune"
                / model
                / f"{ratio.replace('/', '_')}-{target}-{select}"
                / "model.onnx"
            )
            save_model(apply_plan(original, plan), path)
            carry_manifest(original, path)
            plan.save(path.with_suffix(".plan.json"))
            metric, value = quality(path)
            rows.append(
                {
                    "model": model,
                    "ratio": ratio,
                    "method": f"prune {target} ({select})",
                    "blocks": plan.blocks,
                    "parameters_removed": plan.parameters_removed,
                    "parameters_removed_pct": 100.0 * plan.parameters_removed / total,
                    "file_bytes": file_bytes(path),
                    "metric": metric,
                    "value": value,
                }
            )
            log(f"{model} {ratio} prune {target} ({select}) {plan.blocks}: {metric} {value:.4g}")
    return rows


def cka(model: str) -> dict:
    path = exported_model(model)
    batches = make_batches(path, "fortunes", "calib", tokens=CKA_TOKENS, seq_len=128)
    result = sublayer_cka(path, batches, provider="cpu")
    for kind, title in (("ff", "FF sublayer outputs"), ("attention", "attention outputs")):
        heatmap(
            np.asarray(result[kind]["cka"]),
            result[kind]["blocks"],
            f"{model}: linear CKA of {title}",
            RESULTS / f"cka_{model}_{kind}.png",
            colorbar="CKA",
        )
    return result


def markdown(rows: list[dict], similarity: dict) -> str:
    out = [
        "# Layer pruning vs FF merging at equal parameter budgets\n",
        "Same test data and metric as `merge_quality.md`; no training for any method. "
        "Merge rows come from that benchmark (`refit` = least-squares refit).\n",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        own = sorted(
            (r for r in rows if r["model"] == model),
            key=lambda r: ("0", *RATIOS).index(r["ratio"]),
        )
        table = [
            [r["ratio"], r["method"], f"{r['parameters_removed_pct']:.1f}%", f"{r['value']:.4g}"]
            for r in own
        ]
        out.append(f"\n## {model}\n")
        out.append(
            markdown_table(
                ["budget (FFs)", "method", "params removed", own[0]["metric"].replace("_", " ")],
                table,
            )
        )
        for kind in ("ff", "attention"):
            matrix = np.asarray(similarity[model][kind]["cka"])
            off = matrix[np.triu_indices(len(matrix), 1)]
            adjacent = np.diag(matrix, 1)
            out.append(
                f"\nCKA of {kind} outputs: adjacent blocks {adjacent.mean():.3f}, "
                f"all pairs {off.mean():.3f} ({similarity[model]['tokens']} tokens). "
                f"![{kind}](cka_{model}_{kind}.png)\n"
            )
    out.append("\n![quality vs parameters removed](prune_vs_merge.png)\n")
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    args = parser.parse_args()
    rows, similarity = [], {}
    for model in args.models.split(","):
        merges = merge_rows(model)
        for row in merges:
            method = row["method"] + (" merge + refit" if row["refit"] else " merge")
            rows.append({**row, "method": "original" if row["method"] == "original" else method})
        rows.extend(prune_rows(model, merges))
        similarity[model] = cka(model)
        log(f"{model}: CKA done")
    plot_quality_vs_removed(rows, RESULTS / "prune_vs_merge.png", lambda r: r["method"])
    write_results("prune_vs_merge", {"rows": rows, "cka": similarity}, markdown(rows, similarity))


if __name__ == "__main__":
    main()
