"""The report's figure: test quality against size and against speed, the Pareto front marked."""

from __future__ import annotations

__all__ = ["pareto_figure", "pareto_front"]

from pathlib import Path

from layerfuse.reports.plots import pyplot, save_figure


def pareto_front(points: list[tuple[float, float]], lower_x: bool, lower_y: bool) -> list[int]:
    """Indices of the points no other point beats on both axes."""

    def better(a, b, lower):
        return a <= b if lower else a >= b

    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            better(ox, x, lower_x) and better(oy, y, lower_y) and (ox, oy) != (x, y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _panel(axis, rows, x_key, x_label, report, lower_x) -> None:
    metric = report["metric"]
    lower_y = metric == "perplexity"
    points = [(r[x_key], r["quality"]) for r in rows]
    front = pareto_front(points, lower_x, lower_y)
    axis.plot(
        [points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey",
        label="Pareto front",
    )  # fmt: skip
    for row, (x, y) in zip(rows, points, strict=True):
        style = {"marker": "*", "s": 160} if row["name"] == "original" else {"marker": "o", "s": 50}
        if row["name"] in (report["winner"], report["closest"]):  # the verdict's model
            style = {"marker": "D", "s": 90, "edgecolors": "black"}
        axis.scatter([x], [y], label=row["name"], **style)
    original = report["original"]["quality"]
    limit = report["limit"]
    bound = (
        original * (1 + limit["value"])
        if limit["kind"] == "relative"
        else (original - limit["value"] / 100)
    )
    axis.axhline(bound, color="red", linewidth=0.8, label=f"limit {limit['text']}")
    target = report["target"]
    if target["kind"] == "params" and x_key == "params_ratio":
        axis.axvline(
            target["value"], color="orange", linewidth=0.8, label=f"target {target['text']}"
        )
    if target["kind"] == "latency" and x_key == "speedup":
        axis.axvline(
            target["value"], color="orange", linewidth=0.8, label=f"target {target['text']}"
        )
    axis.set_xlabel(x_label)
    axis.set_ylabel("test " + metric.replace("_", " "))
    axis.grid(alpha=0.3)


def pareto_figure(report: dict, path: str | Path) -> Path:
    """Two panels (quality vs parameter ratio, quality vs speed-up) for the original and
    every measured finalist."""
    plt = pyplot()
    rows = [report["original"], *report["finalists"]]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    _panel(axes[0], rows, "params_ratio", "parameters (fraction of the original)", report, True)
    shape = report["space"]["measure"]["shape"]
    _panel(axes[1], rows, "speedup", f"speed-up at {shape} (p50)", report, False)
    axes[1].legend(fontsize=7, loc="best")
    verdict = (
        f"winner {report['winner']}"
        if report["winner"]
        else f"no winner (closest: {report['closest']})"
    )
    figure.suptitle(f"optimize {Path(report['model']).parent.name}: {verdict}", fontsize=10)
    return save_figure(figure, path)
