"""Shared plumbing for benchmark scripts: models, variant folders, result files.

Every script writes ``benchmarks/results/<name>.json`` (numbers, machine, library versions,
the command that regenerates it), ``<name>.md`` (the table a person reads) and, where a
picture helps, ``<name>.png``.
"""

from __future__ import annotations

import json
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


def model_bytes(path: Path) -> int:
    from layerfuse.passes.model_io import external_data_path

    data = external_data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def command_line() -> str:
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def write_results(name: str, results: dict, markdown: str) -> None:
    from layerfuse.runtime.environment import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
        **results,
    }
    for suffix, text in ((".json", json.dumps(payload, indent=1) + "\n"), (".md", markdown)):
        target = RESULTS / f"{name}{suffix}"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    log(f"wrote {RESULTS / name}.json and .md")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
