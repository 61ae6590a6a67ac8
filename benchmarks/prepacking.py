"""Tied SmolLM2 with onnxruntime's CPU weight pre-packing on and off (deployment trade-off).

layerfuse turns pre-packing off by default for graphs that share MatMul weights, because ORT
packs a weight once per node that reads it and a synthetic tied stack then keeps part of the
duplication the tie removed (``tests/test_merge_memory.py``). This measures what that default
costs and saves on the real tied model of ``merge_quality.py`` (1/3 of the FFs, permute+refit).

    python benchmarks/merge_quality.py && python benchmarks/prepacking.py
"""

from __future__ import annotations

from common import RESULTS, WORK, exported_model, log, markdown_table, write_results

from layerfuse.reports.tables import human_bytes
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.inputs import parse_shapes

MODEL = "smollm2-135m"
SHAPES = "1x1,1x32,1x128,4x128"


def main() -> None:
    graphs = {
        "original": exported_model(MODEL),
        "tied (1/3, permute+refit)": WORK / "merge" / MODEL / "1_3-permute-refit" / "model.onnx",
    }
    if not graphs["tied (1/3, permute+refit)"].exists():
        raise SystemExit("run benchmarks/merge_quality.py first")
    documents = {}
    for switch in (False, True):
        label = "on" if switch else "off"
        log(f"benchmarking with pre-packing {label}")
        config = BenchConfig(
            shapes=parse_shapes(SHAPES), provider="cpu", warmup=2, runs=15, prepacking=switch
        )
        documents[label] = run_bench(list(graphs.values()), config, names=list(graphs))
    rows = []
    for label, document in documents.items():
        for graph in document["graphs"]:
            rows.append(
                [
                    label,
                    graph["name"],
                    human_bytes(graph["memory"]["after_run_bytes"]),
                    *(f"{graph['latency'][s]['p50_ms']:.2f} ms" for s in SHAPES.split(",")),
                ]
            )
    markdown = (
        f"# {MODEL}: tied weights with CPU pre-packing off (layerfuse's default) and on\n\n"
        "Memory is the RSS growth of a fresh process that builds the session and runs it once; "
        "latency is p50 of interleaved runs. Each setting is one run, so compare rows within a "
        "setting; across settings, compare the tied/original ratios.\n\n"
        + markdown_table(
            ["pre-packing", "graph", "memory", *(f"p50 {s}" for s in SHAPES.split(","))], rows
        )
    )
    write_results("prepacking", {"benchmarks": documents}, markdown)
    log(f"see {RESULTS / 'prepacking.md'}")


if __name__ == "__main__":
    main()
