"""The regression gate this project's own CI runs: a tiny Llama, original vs tied.

It builds the tiny random-weight model the tests use, exports it, ties a window of its FF
sublayers, and benchmarks both graphs with ``layerfuse bench`` against the committed
baseline. Only ratios are compared (speedup per shape, memory, file size), with a tolerance
wide enough for a shared 2-core CI machine.

    python benchmarks/ci_gate.py            # gate against benchmarks/baselines/ci-tiny.json
    python benchmarks/ci_gate.py --update   # measure and write a new baseline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from layerfuse.cli import main as layerfuse  # noqa: E402
from tests import tiny_models  # noqa: E402

BASELINE = ROOT / "benchmarks" / "baselines" / "ci-tiny.json"
TOLERANCE = "30%"


def prepare(work: Path) -> tuple[Path, Path]:
    from layerfuse.export.onnx_export import export_model
    from layerfuse.export.sources import load_source

    original = work / "original" / "model.onnx"
    if not original.exists():
        tiny_models.save_folder("llama", work / "hf")
        export_model(load_source(str(work / "hf")), original.parent)
    tied = work / "tied" / "model.onnx"
    if (
        layerfuse(
            ["merge", str(original), "-o", str(tied), "--blocks", "0-3", "--method", "vanilla"]
        )
        != 0
    ):
        raise SystemExit("merging the tiny model failed")
    return original, tied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write a new baseline")
    parser.add_argument("--work", default=str(ROOT / "runs" / "ci-gate"))
    args = parser.parse_args()
    original, tied = prepare(Path(args.work))
    command = [
        "bench",
        str(original),
        str(tied),
        "--names",
        "original,tied",
        "--inputs",
        "1x32,4x64",
        "--runs",
        "40",
        "--threads",
        "1",
    ]
    if args.update:
        return layerfuse([*command, "--json", str(BASELINE)])
    return layerfuse([*command, "--baseline", str(BASELINE), "--max-regression", TOLERANCE])


if __name__ == "__main__":
    sys.exit(main())
