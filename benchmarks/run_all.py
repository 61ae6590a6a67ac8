"""Regenerate the core results in benchmarks/results/ and the summary page of all of them.

    python benchmarks/run_all.py          # about 5 hours on 2 CPU cores
    python benchmarks/run_all.py --summary-only

The summary lists every result with the command that produced it (the studies that take
hours each, such as quality_compute, big_models or optimize, run from their own commands).
Runs, in order: merge quality and ablations, pruning vs merging and CKA, FFN Fusion latency,
the side-by-side harness run, pre-packing, the family matrix, recovery training, the
toolchain (quantization, optimizer), decoding against onnxruntime-genai and the serving load
test, then writes SUMMARY.md.
The CUDA results (``*_cuda.*``) come from ``ffn_fusion.py --provider cuda --tag cuda`` and the
``layerfuse bench`` command recorded in ``harness_cuda.json``, run on a GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STEPS = (
    "merge_quality.py",
    "merge_ablations.py",
    "prune_vs_merge.py",
    "ffn_fusion.py",
    "side_by_side.py",
    "prepacking.py",
    "family_matrix.py",
    "recovery.py",
    "toolchain.py",
    "decode.py",
    "serve_load.py",
)


def summary() -> str:
    lines = [
        "# Benchmark results\n",
        "Every file here comes from one script in `benchmarks/`, run by the command in its "
        "row; `python benchmarks/run_all.py` reruns the core set and rewrites this page.\n",
        "| result | produced by | command | date | machine |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        machine = data.get("environment", {}).get("machine", {})
        described = f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
        if machine.get("gpu"):
            described += f", {machine['gpu']}"
        lines.append(
            f"| [{path.stem}]({path.stem}.md) | `{data.get('benchmark', path.stem)}` | "
            f"`{data.get('command', '')}` | {data.get('date', '')} | {described} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    steps = () if "--summary-only" in sys.argv[1:] else STEPS
    for step in steps:
        print(f"== {step}", flush=True)
        if subprocess.run([sys.executable, str(HERE / step)], check=False).returncode != 0:
            print(f"{step} failed", file=sys.stderr)
            return 1
    (RESULTS / "SUMMARY.md").write_text(summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
