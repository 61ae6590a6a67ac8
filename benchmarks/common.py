"""Shared plumbing for benchmark scripts: models, variant folders, result files.

Every script writes ``benchmarks/results/<name>.json`` (numbers, machine, library versions,
the command that regenerates it), ``<name>.md`` (the table a person reads) and, where a
picture helps, ``<name>.png``.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = Path(os.environ.get("LAYERFUSE_BENCH_DIR", ROOT / "runs" / "bench"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def exported_model(name: str) -> Path:
    """The packaged model ``name`` exported once into the benchmark work folder."""
    from layerfuse.export.onnx_export import export_model
    from layerfuse.export.sources import load_source

    path = WORK / "models" / name / "model.onnx"
    if not path.exists():
        log(f"exporting {name}")
        export_model(load_source(name), path.parent)
    return path


def command_line() -> str:
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def write_results(name: str, results: dict, markdown: str) -> None:
    from layerfuse.files import write_json_atomic, write_text_atomic
    from layerfuse.runtime.environment import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
        **results,
    }
    write_json_atomic(RESULTS / f"{name}.json", payload)
    write_text_atomic(RESULTS / f"{name}.md", markdown)
    log(f"wrote {RESULTS / name}.json and .md")


def notes_section(name: str, notes: Path | None) -> str:
    """The written notes that end ``results/<name>.md``: the file ``notes`` when given, else
    the ``## Notes`` section already there, so ``--write-only`` without ``--notes`` keeps
    them and the recorded command regenerates the same Markdown."""
    if notes is not None:
        return "\n" + notes.read_text()
    existing = RESULTS / f"{name}.md"
    text = existing.read_text() if existing.exists() else ""
    start = text.find("\n## Notes")
    return "" if start < 0 else text[start:]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_quality_vs_removed(rows: list[dict], path: Path, series) -> None:
    """One panel per model: quality against % of parameters removed, a line per series.

    ``series(row)`` names the line a row belongs to; the original model (``method ==
    "original"``) starts every line at 0%.
    """
    from layerfuse.reports.plots import pyplot, save_figure

    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        own = [r for r in rows if r["model"] == model]
        base = next(r for r in own if r["method"] == "original")
        for name in dict.fromkeys(series(r) for r in own if r["method"] != "original"):
            line = sorted(
                (r for r in own if r["method"] != "original" and series(r) == name),
                key=lambda r: r["parameters_removed_pct"],
            )
            axis.plot(
                [0.0] + [r["parameters_removed_pct"] for r in line],
                [base["value"]] + [r["value"] for r in line],
                marker="o",
                linestyle="--" if "refit" in name else "-",
                label=name,
            )
        axis.set_title(model)
        axis.set_xlabel("% of model parameters removed")
        axis.set_ylabel(base["metric"].replace("_", " "))
        if base["metric"] == "perplexity":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(figure, path)
