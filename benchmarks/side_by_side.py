"""The variants of the other benchmarks against the original SmolLM2, in one harness run.

Uses the graphs that ``merge_quality.py``, ``prune_vs_merge.py`` and ``ffn_fusion.py`` wrote:
the best 1/3 merge (tied weights), block pruning at the same budget, and the fused model
(`fused`: the run fused except its last FFN, as in the paper).
All are measured together by ``layerfuse bench`` (interleaved, with memory and perplexity).

    python benchmarks/side_by_side.py
"""

from __future__ import annotations

import json

from common import RESULTS, WORK, exported_model, log, write_results

from layerfuse.reports.bench_render import bench_figure, bench_markdown
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.inputs import parse_shapes

MODEL = "smollm2-135m"


def best_merge() -> str:
    rows = json.loads((RESULTS / "merge_quality.json").read_text())["rows"]
    candidates = [r for r in rows if r["model"] == MODEL and r["ratio"] == "1/3"]
    best = min(candidates, key=lambda r: r["value"])
    return f"1_3-{best['method']}" + ("-refit" if best["refit"] else "")


def main() -> None:
    merge = best_merge()
    graphs = {
        "original": exported_model(MODEL),
        f"merged ({merge})": WORK / "merge" / MODEL / merge / "model.onnx",
        "pruned (1/3, blocks)": WORK / "prune" / MODEL / "1_3-block-influence" / "model.onnx",
        "fused (paper: last FFN of the run unfused)": WORK / "fusion" / "fused" / "model.onnx",
    }
    missing = [str(path) for path in graphs.values() if not path.exists()]
    if missing:
        raise SystemExit(f"run the other benchmarks first; missing {', '.join(missing)}")
    config = BenchConfig(
        shapes=parse_shapes("1x1,1x32,1x128,4x128"),
        provider="cpu",
        warmup=2,
        runs=15,
        eval_data="fortunes",
        eval_tokens=8192,
    )
    log("benchmarking the variants side by side")
    document = run_bench(list(graphs.values()), config, names=list(graphs))
    bench_figure(document, RESULTS / "side_by_side.png")
    markdown = (
        f"# {MODEL}: every variant against the original, one harness run\n\n"
        "Quality is test-split perplexity on fortunes text (8192 tokens); no variant was "
        "trained.\n\n" + bench_markdown(document) + "\n![side by side](side_by_side.png)\n"
    )
    write_results("side_by_side", {"bench": document}, markdown)


if __name__ == "__main__":
    main()
