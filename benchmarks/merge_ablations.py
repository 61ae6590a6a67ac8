"""Merge ablations on a fixed window: anchor choice and the activations neurons are aligned on.

For each model the window is the one ``merge_quality.py`` chose for 1/3 of the FF sublayers
(permute method), so only the varied setting changes: the anchor (first, middle, last FF of
the window) and the features (the pre-activation, as in the paper, or the hidden tensor the
down-projection reads, which for SwiGLU includes the up branch). No refit, no training.

    python benchmarks/merge_quality.py && python benchmarks/merge_ablations.py
"""

from __future__ import annotations

import json

from common import RESULTS, WORK, exported_model, log, markdown_table, write_results
from merge_quality import quality

from layerfuse.model.io import save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings

SETTINGS = (
    ("first", "pre_activation", "permute"),
    ("middle", "pre_activation", "permute"),
    ("last", "pre_activation", "permute"),
    ("first", "hidden", "permute"),
    ("first", "pre_activation", "vanilla"),
)


def window_of(model: str) -> tuple[int, int]:
    rows = json.loads((RESULTS / "merge_quality.json").read_text())["rows"]
    row = next(
        r
        for r in rows
        if r["model"] == model
        and r["ratio"] == "1/3"
        and r["method"] == "permute"
        and not r["refit"]
    )
    return tuple(row["window"])


def ablation_row(model: str, original, window: tuple[int, int], setting: tuple) -> dict:
    """Merge ``window`` with one (anchor, features, method) setting and measure the result."""
    anchor, features, method = setting
    request = MergeRequest(
        ranges=[window],
        method=method,
        anchor=anchor,
        features=features,
        data=DataSettings(calib_tokens=10240, provider="cpu"),
    )
    plan = plan_merge(original, request)
    path = WORK / "ablations" / model / f"{method}-{anchor}-{features}" / "model.onnx"
    save_model(apply_plan(original, plan), path)
    carry_manifest(original, path)
    metric, value = quality(path)
    matched = plan.windows[0].matched_correlation
    log(f"{model} {method} anchor={anchor} features={features}: {metric} {value:.4g}")
    return {
        "model": model,
        "window": list(window),
        "anchor": anchor,
        "features": features,
        "method": method,
        "metric": metric,
        "value": value,
        "mean_matched_correlation": (sum(matched.values()) / len(matched) if matched else None),
    }


def markdown(rows: list[dict]) -> str:
    out = [
        "# Merge ablations: anchor and alignment features\n",
        "Fixed window per model (the 1/3 permute window of `merge_quality.md`); test split; "
        "no refit, no training.\n",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        out.append(f"\n## {model}, blocks {own[0]['window'][0]}-{own[0]['window'][1]}\n")
        out.append(
            markdown_table(
                [
                    "method",
                    "anchor",
                    "aligned on",
                    "mean matched correlation",
                    own[0]["metric"].replace("_", " "),
                ],
                [
                    [
                        r["method"],
                        r["anchor"],
                        r["features"] if r["method"] == "permute" else "-",
                        "-"
                        if r["mean_matched_correlation"] is None
                        else f"{r['mean_matched_correlation']:.3f}",
                        f"{r['value']:.4g}",
                    ]
                    for r in own
                ],
            )
        )
    return "".join(out)


def main() -> None:
    rows = []
    for model in ("smollm2-135m", "minilm-l6"):
        original = exported_model(model)
        window = window_of(model)
        for setting in SETTINGS:
            rows.append(ablation_row(model, original, window, setting))
    write_results("merge_ablations", {"rows": rows}, markdown(rows))


if __name__ == "__main__":
    main()
