"""FFN Fusion on SmolLM2-135M: latency and perplexity side by side (issue 5).

Graphs, all measured in one interleaved ``layerfuse bench`` run per group of shapes:

- ``original``;
- ``no-attention``: the K consecutive attention sublayers whose removal hurts validation
  perplexity least are removed (one run of K+1 FFN-only blocks appears);
- ``fused``: that run fused into one wide FFN node, the last FFN left out as in the paper;
- ``fused-all``: the whole run fused.

Also measured: the fused run alone against the same blocks unfused (subgraphs from the run's
input to its output), at decode-like and prefill shapes, and perplexity of every variant on
the test split.

    python benchmarks/ffn_fusion.py                 # CPU (about 25 min on 2 cores)
    python benchmarks/ffn_fusion.py --provider cuda --tag cuda
"""

from __future__ import annotations

import argparse

import onnx.utils
from common import RESULTS, WORK, exported_model, log, markdown_table, write_results
from merge_quality import quality

from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan, FuseRequest, plan_fuse
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.reports.bench_render import bench_figure, bench_markdown
from layerfuse.reports.plots import bar_chart, heatmap
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.inputs import parse_shapes

MODEL = "smollm2-135m"
WHOLE_SMALL = "1x1,1x32,8x32"
WHOLE_LARGE = "1x512,8x512"
RUN_SHAPES = "1x1,1x32,8x32,1x512,8x512"


def variant(original, plan: FusePlan, name: str):
    path = WORK / "fusion" / name / "model.onnx"
    save_model(apply_plan(original, plan), path)
    carry_manifest(original, path)
    plan.save(path.with_suffix(".plan.json"))
    return path


def run_subgraph(model_path, run_input: str, run_output: str, name: str):
    """The graph from the run's input stream to its output stream (weights inlined)."""
    path = WORK / "fusion" / "runs" / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.utils.extract_model(str(model_path), str(path), [run_input], [run_output])
    return path


def fuse_plans(original, args) -> dict[str, FusePlan]:
    """The chosen plan (``fused``), the same attention removed with nothing fused
    (``no-attention``) and the whole FFN-only run fused (``fused-all``)."""
    log("choosing attention to remove and measuring block dependency")
    plan = plan_fuse(
        original,
        FuseRequest(
            drop_attention=args.drop,
            contiguous=True,
            data=DataSettings(calib_tokens=2048, valid_tokens=2048, provider=args.provider),
        ),
    )
    (run,) = plan.ffn_only_runs
    no_attention = FusePlan(plan.fingerprint, plan.num_blocks, plan.drop_attention, [])
    all_plan = FusePlan(
        plan.fingerprint,
        plan.num_blocks,
        plan.drop_attention,
        [run],
        ffn_only_runs=plan.ffn_only_runs,
        include_last=True,
    )
    return {"no-attention": no_attention, "fused": plan, "fused-all": all_plan}


def run_subgraphs(paths: dict, plan: FusePlan) -> dict:
    """The fused run alone and the same blocks unfused, from the run's input to its output."""
    first = plan.ffn_only_runs[0][0]
    reduced = detect_structure(load_model(paths["no-attention"]))
    run_input = reduced.blocks[first].ff_wiring.norm.input.name
    group_last = plan.fuse[0][1]
    return {
        "unfused run": run_subgraph(
            paths["no-attention"],
            run_input,
            reduced.blocks[group_last].ff_wiring.residual.output.name,
            "unfused",
        ),
        "fused run": run_subgraph(
            paths["fused"], run_input, f"layerfuse.fused.{first}-{group_last}.out", "fused"
        ),
    }


def benchmark(paths: dict, subgraphs: dict, provider: str) -> dict:
    """One interleaved ``layerfuse bench`` document per group of shapes."""
    documents = {}
    for label, shapes, runs, graphs in (
        ("whole model, short", WHOLE_SMALL, 20, paths),
        ("whole model, long", WHOLE_LARGE, 5, paths),
        ("fused run alone", RUN_SHAPES, 30, subgraphs),
    ):
        log(f"benchmarking {label}")
        config = BenchConfig(
            shapes=parse_shapes(shapes),
            provider=provider,
            warmup=2,
            runs=runs,
            memory=label.startswith("whole model, short"),
        )
        documents[label] = run_bench(list(graphs.values()), config, names=list(graphs))
    return documents


def figures(plan: FusePlan, documents: dict, args) -> None:
    tag = args.tag
    bench_figure(documents["whole model, short"], RESULTS / f"ffn_fusion_{tag}.png")
    bench_figure(documents["fused run alone"], RESULTS / f"ffn_fusion_run_{tag}.png")
    for entry in plan.dependency:
        a, b = entry["run"]
        heatmap(
            entry["matrix"],
            list(range(a, b + 1)),
            f"{MODEL}: dependency of FFN j (col) on FFN i (row)",
            RESULTS / "ffn_fusion_dependency.png",
            colorbar="mean cosine distance",
            vmax=None,
        )
    starts = [i for i, s in enumerate(plan.attention_scores) if s is not None]
    bar_chart(
        [f"{i}-{i + args.drop - 1}" for i in starts],
        {"perplexity": [plan.attention_scores[i] for i in starts]},
        f"{MODEL}: validation perplexity with {args.drop} consecutive attention removed",
        "perplexity",
        RESULTS / "ffn_fusion_attention.png",
        reference_line=plan.baseline_score,
    )


def markdown(plan: FusePlan, perplexity: dict, documents: dict, args) -> str:
    first, last = plan.ffn_only_runs[0]
    group_last = plan.fuse[0][1]
    tag = args.tag
    out = [
        f"# FFN Fusion on {MODEL} ({args.provider})\n\n",
        f"Attention removed from blocks {plan.drop_attention[0]}-{plan.drop_attention[-1]} "
        f"(best window of {args.drop} on validation perplexity, see "
        f"`ffn_fusion_attention.png`), leaving FFN-only run {first}-{last}. `fused` fuses "
        f"blocks {first}-{group_last} into one `layerfuse.FusedSwiGLU` node (the last FFN of "
        f"the run left out, as in the paper); `fused-all` fuses {first}-{last}. No training.\n\n",
        markdown_table(
            ["graph", "perplexity (test)"],
            [[name, f"{value:.4g}"] for name, value in perplexity.items()],
        ),
    ]
    for label, document in documents.items():
        out.append(f"\n## {label}\n\n{bench_markdown(document)}")
    out.append(
        f"\n![whole model](ffn_fusion_{tag}.png)\n![run](ffn_fusion_run_{tag}.png)\n"
        "![dependency](ffn_fusion_dependency.png)\n"
    )
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", type=int, default=6, help="attention sublayers removed")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--tag", default="cpu", help="suffix of the result files")
    args = parser.parse_args()
    original = exported_model(MODEL)
    plans = fuse_plans(original, args)
    plan = plans["fused"]
    paths = {"original": original}
    paths |= {name: variant(original, plans[name], name) for name in plans}
    documents = benchmark(paths, run_subgraphs(paths, plan), args.provider)
    perplexity = {}
    for name, path in paths.items():
        perplexity[name] = quality(path)[1]
        log(f"{name}: perplexity {perplexity[name]:.4g}")
    figures(plan, documents, args)
    write_results(
        f"ffn_fusion_{args.tag}",
        {
            "plan": plan.to_json(),
            "perplexity": perplexity,
            "benchmarks": documents,
        },
        markdown(plan, perplexity, documents, args),
    )


if __name__ == "__main__":
    main()
