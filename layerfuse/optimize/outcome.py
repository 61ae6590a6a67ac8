"""The end of a search: judge the measured finalists, write the winner and the report.

The winner is the finalist with the best test quality among those whose *measured* files
meet the target and whose test quality is within the limit (a tie goes to fewer
parameters). When none qualifies, no winner is written and the report names the finalist
that came closest to the limit (among those meeting the target).
"""

from __future__ import annotations

__all__ = ["judge", "write_outcome"]

from pathlib import Path

from layerfuse.files import write_json_atomic, write_text_atomic
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.optimize.finalists import plan_file, save_plans, screened_plans
from layerfuse.optimize.report import report_markdown
from layerfuse.optimize.report_figure import pareto_figure

SCHEMA = "layerfuse.optimize-report/1"


def _row(name: str, candidate, measured: dict, original: dict, request, metric: str) -> dict:
    """A finalist's judged row. A quantized finalist (``NAME+int4``) keeps its source's
    parameter count (packing four-bit weights into bytes removes no parameter; its weight
    bytes are what shrink) and its source's plan and recovery."""
    row = dict(measured)
    row["name"] = name
    base, _, scheme = name.partition("+")
    if scheme:
        row["quantized"] = scheme
        row["packed_parameters"] = measured["parameters"]
        row["parameters"] = candidate.results["screen"]["parameters"]
    row["params_ratio"] = row["parameters"] / original["parameters"]
    row["meets_target"] = request.target.met(
        row["params_ratio"], measured["speedup"], measured["weight_bytes"]
    )
    row["meets_limit"] = request.limit.allows(original["quality"], measured["quality"])
    row["quality_loss"] = request.limit.loss(original["quality"], measured["quality"])
    if candidate is not None:
        row.update(kind=candidate.kind, options=candidate.options)
        folder = request.output / "finalists" / base
        plans = [str(plan_file(folder, i)) for i in range(len(screened_plans(candidate)))]
        row["plan"] = plans[0]
        if len(plans) > 1:
            row["plans"] = plans
        row["screen"] = candidate.results["screen"]
        row["recover"] = candidate.results["recover"]
    return row


def judge(rows: list[dict], metric: str) -> tuple[dict | None, dict | None]:
    """(winner, closest): the best qualifying row, else the target-meeting row nearest the limit."""
    sign = -1 if metric == "perplexity" else 1
    qualified = [r for r in rows if r["meets_target"] and r["meets_limit"]]
    if qualified:
        return min(
            qualified, key=lambda r: (-sign * r["quality"], r["parameters"], r["name"])
        ), None
    near = [r for r in rows if r["meets_target"]] or rows
    closest = min(near, key=lambda r: (r["quality_loss"], r["name"])) if near else None
    return None, closest


def _why(winner: dict | None, closest: dict | None, rows: list[dict], request) -> str:
    limit = request.limit
    unit = "x the original's perplexity" if limit.kind == "relative" else " points of accuracy lost"

    def loss(r):
        return (
            f"{1 + r['quality_loss']:.3f}"
            if limit.kind == "relative"
            else f"{r['quality_loss']:.2f}"
        )

    if winner is not None:
        others = [r for r in rows if r is not winner and r["meets_target"] and r["meets_limit"]]
        text = (
            f"{winner['name']} won: its measured file meets the target {request.target.text} "
            f"({winner['params_ratio']:.3f} of the parameters, {winner['speedup']:.2f}x speed) "
            f"and its test quality is {loss(winner)}{unit} (limit {request.limit.text}); "
        )
        if others:
            return text + f"it has the best quality of the {len(others) + 1} finalists within both."
        return text + "no other finalist met both the target and the limit."
    if closest is None:
        return "no candidate met the target, so nothing was recovered"
    return (
        f"no finalist met the quality limit {request.limit.text}; the closest was "
        f"{closest['name']} at {loss(closest)}{unit} (its files are in finalists/{closest['name']})"
    )


def _write_winner(request, winner: dict) -> Path:
    target = request.output / "winner" / "model.onnx"
    source = Path(winner["path"])
    save_model(load_model(source), target)
    carry_manifest(source, target)
    save_plans(winner.get("plans", [winner["plan"]]), target.parent)
    return target


def write_outcome(request, candidates, finalists, measured, context, reporter) -> dict:
    """Judge, write ``winner/`` (when there is one) and ``report.json|md|png``."""
    metric, state = context["metric"], context["state"]
    original = {"name": "original", **measured["original"], "params_ratio": 1.0}
    by_name = {c.name: c for c in finalists}
    rows = [
        _row(n, by_name[n.partition("+")[0]], measured[n], original, request, metric)
        for n in measured
        if n != "original"
    ]
    winner, closest = judge(rows, metric)
    report = {
        "schema": SCHEMA,
        "model": str(request.model),
        "metric": metric,
        "target": request.target.to_json(),
        "limit": request.limit.to_json(),
        "budget": request.budget.to_json(),
        "data": request.data,
        "seed": request.seed,
        "space": request.space.to_json(),
        "original": original,
        "candidates": [c.to_json() | {"finalist": c.name in by_name} for c in candidates],
        "not_proposed": context["notes"],
        "finalists": rows,
        "winner": None if winner is None else winner["name"],
        "closest": None if closest is None else closest["name"],
        "why": _why(winner, closest, rows, request),
        "stages": state.data["done"].get("stage", {}),
    }
    if winner is not None:
        report["winner_model"] = str(_write_winner(request, winner))
    figure = pareto_figure(report, request.output / "report.png")
    report["figure"] = str(figure)
    write_text_atomic(request.output / "report.md", report_markdown(report))
    write_json_atomic(request.output / "report.json", report)
    reporter.step(report["why"])
    return report
