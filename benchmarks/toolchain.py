"""Do the tie's and the fusion's savings survive the rest of the onnxruntime toolchain? (issue 15)

Three SmolLM2-135M graphs, each taken through the steps a user applies next:

- ``original``; ``tied``: 1/3 of the FFs (blocks 19-29, 11 FFs -> 1, 19.7% of the parameters)
  share one set of weights (vanilla merge: no calibration; quality is not the point here,
  what each step does to it is); ``fused``: attention of blocks 4-9 removed and FFN blocks 3-8
  fused into one ``FusedSwiGLU`` (the run of ``ffn_fusion.md``);
- steps: ``float32`` (default session options under layerfuse's pre-packing policy),
  ``int8`` (``quantize_dynamic``), ``int4`` (``MatMulNBits``, block 32), both with the tied
  word embeddings quantized once for lookup and logits, ``fp16`` (for CUDA:
  sizes and ties only on CPU), ``optimized`` (onnxruntime transformers optimizer, gpt2
  fusions).

Per step: file size, unique weight bytes (equal contents counted once), whether every tied set
is still one initializer, memory (fresh process), p50 latency of the three graphs interleaved
in one run (ratios against that step's original, e.g. the optimizer's graph of the original),
and test perplexity.

    python benchmarks/toolchain.py                    # CPU, about 20 min on 2 cores
    python benchmarks/toolchain.py --provider cuda --cuda-graph --tag cuda
"""

from __future__ import annotations

import argparse
import logging

from common import RESULTS, WORK, exported_model, log, markdown_table, write_results

from layerfuse.data.batches import make_batches
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.stats import model_stats
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.inputs import parse_shapes
from layerfuse.runtime.quality import perplexity
from layerfuse.runtime.session import create_session
from layerfuse.toolchain import convert_fp16, optimize, quantize_model

MODEL = "smollm2-135m"
GRAPHS = ("original", "tied", "fused")
STEPS = {
    "float32": None,
    "int8": lambda src, out: quantize_model(src, out, "int8"),
    "int4": lambda src, out: quantize_model(src, out, "int4"),
    "fp16": convert_fp16,
    "optimized": optimize,
}
TIED_TARGET = 0.81
TEST_TOKENS = 4096


def base_graphs() -> dict[str, object]:
    original = exported_model(MODEL)
    folder = WORK / "toolchain"
    paths = {"original": original, "tied": folder / "tied" / "model.onnx"}
    paths["fused"] = folder / "fused" / "model.onnx"
    if not paths["tied"].exists():
        plan = plan_merge(original, MergeRequest(ranges=[(19, 29)], method="vanilla"))
        save_model(apply_plan(original, plan), paths["tied"])
        carry_manifest(original, paths["tied"])
    if not paths["fused"].exists():
        model = load_model(original)
        blocks = len(detect_structure(model).blocks)
        plan = FusePlan(fingerprint(model), blocks, list(range(4, 10)), [(3, 8)])
        save_model(apply_plan(original, plan), paths["fused"])
        carry_manifest(original, paths["fused"])
    return paths


def convert_all(paths: dict) -> tuple[dict, dict]:
    """Every (step, graph) path, and the conversion records (ties, unique bytes)."""
    variants = {"float32": dict(paths)}
    records: dict = {}
    for step, convert in STEPS.items():
        if convert is None:
            continue
        variants[step] = {}
        for name, source in paths.items():
            out = WORK / "toolchain" / f"{name}-{step}" / "model.onnx"
            log(f"{step}: converting {name}")
            result = convert(source, out)
            variants[step][name] = out
            records[f"{step}/{name}"] = result.to_json()
    return variants, records


def measure_step(step: str, paths: dict, args) -> dict:
    runnable = step != "fp16" or args.provider == "cuda"
    config = BenchConfig(
        shapes=parse_shapes(args.shapes),
        provider=args.provider,
        warmup=3,
        runs=args.runs,
        memory=runnable,
        cuda_graph=args.cuda_graph,
    )
    if not runnable:
        return {"stats": {name: model_stats(path).to_json() for name, path in paths.items()}}
    log(f"{step}: benchmarking {', '.join(paths)}")
    document = run_bench(list(paths.values()), config, names=list(paths))
    for graph, path in zip(document["graphs"], paths.values(), strict=True):
        log(f"{step}: perplexity of {graph['name']}")
        session = create_session(path, provider=args.provider)
        batches = make_batches(path, "fortunes", "test", tokens=TEST_TOKENS, seq_len=128)
        graph["perplexity"] = perplexity(session, batches)
        del session
    return document


def rows_for(step: str, document: dict, shapes: list[str]) -> list[list]:
    rows = []
    stats = {g["name"]: g["stats"] for g in document.get("graphs", [])} or document["stats"]
    unique = {name: s["unique_content_bytes"] for name, s in stats.items()}
    graphs = {g["name"]: g for g in document.get("graphs", [])}
    for name in GRAPHS:
        graph = graphs.get(name)
        memory = graph["memory"]["after_run_bytes"] / 2**20 if graph else None
        rows.append(
            [
                step,
                name,
                f"{stats[name]['file_bytes'] / 2**20:.1f}",
                f"{unique[name] / 2**20:.1f} ({unique[name] / unique['original']:.3f}x)",
                "-" if memory is None else f"{memory:.0f}",
                *(
                    f"{graph['latency'][s]['p50_ms']:.1f} ({graph['ratios']['speedup'][s]:.2f}x)"
                    if graph
                    else "-"
                    for s in shapes
                ),
                f"{graph['perplexity']:.1f}" if graph else "-",
            ]
        )
    return rows


def summary(documents: dict, records: dict, shapes: list[str]) -> tuple[str, dict]:
    rows, checks = [], {}
    for step, document in documents.items():
        rows += rows_for(step, document, shapes)
        stats = {g["name"]: g["stats"] for g in document.get("graphs", [])} or document["stats"]
        ratio = stats["tied"]["unique_content_bytes"] / stats["original"]["unique_content_bytes"]
        ties = records.get(f"{step}/tied", {}).get("ties_kept")
        checks[step] = {"tied_unique_ratio": ratio, "met": ratio <= TIED_TARGET, "ties": ties}
    headers = ["step", "graph", "file MiB", "unique weights MiB", "memory MiB"]
    headers += [f"p50 {s} ms (speed-up)" for s in shapes] + ["perplexity"]
    table = markdown_table(headers, rows)
    target = markdown_table(
        ["step", "tied / original unique weight bytes", f"<= {TIED_TARGET}x", "ties kept"],
        [
            [step, f"{c['tied_unique_ratio']:.3f}", "yes" if c["met"] else "NO", c["ties"]]
            for step, c in checks.items()
        ],
    )
    return table + "\n" + target, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA graphs + IO binding")
    parser.add_argument("--shapes", default="1x1,1x32,1x128")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--tag", help="suffix of the result files (default: none)")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the quantizers log every node
    paths = base_graphs()
    variants, records = convert_all(paths)
    documents = {step: measure_step(step, variants[step], args) for step in variants}
    shapes = args.shapes.split(",")
    table, checks = summary(documents, records, shapes)
    name = f"toolchain_{args.tag}" if args.tag else "toolchain"
    write_results(
        name,
        {"benchmarks": documents, "conversions": records, "target": checks},
        markdown(table, args, name),
    )
    plot(documents, shapes, RESULTS / f"{name}.png")
    log(f"see {RESULTS / name}.md")


def markdown(table: str, args, name: str) -> str:
    return (
        f"# {MODEL} through the onnxruntime toolchain ({args.provider})\n\n"
        "Graphs: `original`; `tied`: FFs of blocks 19-29 share one set of weights (vanilla "
        "merge, 19.7% of the parameters removed); `fused`: attention of blocks 4-9 removed, FFN "
        "blocks 3-8 fused into one node. Each step converts the three graphs with onnxruntime's "
        "own tool through `layerfuse quantize`/`convert` (which checks that every tied set is "
        "still one initializer); int8/int4 also quantize the tied word embedding table once, "
        "shared by the input lookup and the logits projection (onnxruntime's quantizers leave "
        "it float32: 113 MB of 540). Memory: RSS growth of a fresh process that builds the session "
        "(default options, layerfuse's pre-packing policy) and runs it once. Latency: p50 of "
        "the three graphs interleaved in one run per step; speed-ups are against that step's "
        "original (for `optimized`, the optimizer's graph of the original). Perplexity: "
        f"{TEST_TOKENS} test tokens of fortunes. `fp16` is a CUDA format: on CPU only sizes "
        "and ties are reported. Unique weights: initializer bytes with equal contents counted "
        "once.\n\n" + table + f"\n![toolchain]({name}.png)\n"
    )


def plot(documents: dict, shapes: list[str], path) -> None:
    from layerfuse.reports.plots import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = list(documents)
    for offset, name in enumerate(GRAPHS):
        uniques, speeds = [], []
        for step in steps:
            document = documents[step]
            stats = {g["name"]: g["stats"] for g in document.get("graphs", [])}
            stats = stats or document["stats"]
            uniques.append(stats[name]["unique_content_bytes"] / 2**20)
            graph = next((g for g in document.get("graphs", []) if g["name"] == name), None)
            speeds.append(graph["ratios"]["speedup"][shapes[1]] if graph else 0.0)
        positions = [i + (offset - 1) * 0.27 for i in range(len(steps))]
        axes[0].bar(positions, uniques, width=0.27, label=name)
        axes[1].bar(positions, speeds, width=0.27, label=name)
    for axis, title in zip(
        axes, ("unique weight MiB", f"speed-up vs the step's original, {shapes[1]}"), strict=True
    ):
        axis.set_xticks(range(len(steps)), steps)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(figure, path)


if __name__ == "__main__":
    main()
