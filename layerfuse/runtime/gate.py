"""The CI regression gate: did any ratio against the reference graph get worse than allowed?

Only ratios measured within one run are compared (speedup per input shape, memory, file
size, and the quality metric), never absolute times, so a baseline recorded on one machine
still gates runs on another. Graphs are matched by name.
"""

from __future__ import annotations

__all__ = ["Regression", "find_regressions", "parse_tolerance"]

import json
import os
from dataclasses import dataclass
from pathlib import Path

from layerfuse.errors import LayerfuseError

# Which direction is worse for each quality metric.
_LOWER_IS_BETTER = {"perplexity"}


@dataclass
class Regression:
    graph: str
    measure: str
    baseline: float
    current: float

    @property
    def change(self) -> float:
        return (self.current - self.baseline) / self.baseline if self.baseline else 0.0

    def describe(self) -> str:
        return (
            f"{self.graph}: {self.measure} {self.baseline:.4g} -> {self.current:.4g} "
            f"({self.change:+.1%})"
        )


def parse_tolerance(text: str) -> float:
    try:
        value = float(text.strip().rstrip("%")) / (100.0 if text.strip().endswith("%") else 1.0)
    except ValueError:
        raise LayerfuseError(f"--max-regression '{text}' is not a percentage like 10%") from None
    if not 0 <= value < 1:
        raise LayerfuseError(f"--max-regression {text} must be between 0% and 100%")
    return value


def load_baseline(path: str | os.PathLike) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerfuseError(f"baseline {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != "layerfuse.bench/1":
        raise LayerfuseError(f"baseline {path} is not a layerfuse bench result")
    graphs = data.get("graphs")
    if not isinstance(graphs, list) or not all(_is_graph_entry(g) for g in graphs):
        raise LayerfuseError(
            f"baseline {path}: its 'graphs' are damaged (each needs a name and ratios)"
        )
    return data


def _is_graph_entry(entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return False
    ratios = entry.get("ratios")
    if not isinstance(ratios, dict) or not isinstance(ratios.get("speedup", {}), dict):
        return False
    numbers = list(ratios.get("speedup", {}).values())
    numbers += [ratios[key] for key in ("memory", "file_size") if key in ratios]
    quality = entry.get("quality")
    if quality is not None:
        if not isinstance(quality, dict) or not isinstance(quality.get("metric"), str):
            return False
        numbers.append(quality.get("value"))
    return all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)


def _compare(
    graph: str, measure: str, base: float, now: float, tolerance: float, higher_is_better: bool
) -> Regression | None:
    worse = now < base * (1 - tolerance) if higher_is_better else now > base * (1 + tolerance)
    return Regression(graph, measure, base, now) if worse else None


def find_regressions(current: dict, baseline: dict, tolerance: float) -> list[Regression]:
    """Every ratio of ``current`` that is worse than ``baseline``'s by more than ``tolerance``."""
    before = {graph["name"]: graph for graph in baseline["graphs"]}
    found = []
    for graph in current["graphs"][1:]:
        old = before.get(graph["name"])
        if old is None:
            continue
        name, now_ratios, old_ratios = graph["name"], graph["ratios"], old["ratios"]
        checks = [
            (f"speedup at {shape}", old_ratios["speedup"][shape], value, True)
            for shape, value in now_ratios["speedup"].items()
            if shape in old_ratios.get("speedup", {})
        ]
        for key in ("memory", "file_size"):
            if key in now_ratios and key in old_ratios:
                checks.append((f"{key} ratio", old_ratios[key], now_ratios[key], False))
        quality, old_quality = graph.get("quality"), old.get("quality")
        if quality and old_quality and quality["metric"] == old_quality["metric"]:
            metric = quality["metric"]
            checks.append(
                (metric, old_quality["value"], quality["value"], metric not in _LOWER_IS_BETTER)
            )
        for measure, base, now, higher_is_better in checks:
            regression = _compare(name, measure, base, now, tolerance, higher_is_better)
            if regression is not None:
                found.append(regression)
    return found
