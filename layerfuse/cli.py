"""``layerfuse``: the command line.

Every command reports user mistakes as one ``layerfuse: error: ...`` line on stderr with exit
status 2; progress goes to stderr so that ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from layerfuse import __version__
from layerfuse.errors import LayerfuseError
from layerfuse.progress import ConsoleReporter

Handler = Callable[[argparse.Namespace], int]


def _console():
    from rich.console import Console

    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _cmd_export(args: argparse.Namespace) -> int:
    from layerfuse.export.onnx_export import export_model
    from layerfuse.export.sources import load_source, resolve_source

    resolved = resolve_source(args.source, task=args.task)
    reporter = ConsoleReporter()
    reporter.step(f"loading {resolved.origin}")
    source = load_source(resolved)
    result = export_model(
        source,
        args.output,
        exporter=args.exporter,
        opset=args.opset,
        tolerance=args.tolerance,
        reporter=reporter,
    )
    _console().print(
        f"wrote {result.model_path} ({source.task}, {args.exporter} exporter) in "
        f"{result.seconds:.0f} s; max |onnxruntime - torch| = {result.max_abs_diff:.2e} "
        f"(tolerance {args.tolerance:g})"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from layerfuse.model.io import load_model
    from layerfuse.passes.detect import detect_structure
    from layerfuse.reports.tables import human_bytes, human_count, structure_table

    structure = detect_structure(load_model(args.model))
    if args.json:
        print(json.dumps(structure.to_json(), indent=2))
        return 0
    console = _console()
    console.print(structure_table(structure, f"{args.model}: {len(structure.blocks)} blocks"))
    share = structure.ff_parameter_count / max(structure.parameter_count, 1)
    console.print(
        f"parameters {human_count(structure.parameter_count)} "
        f"({human_bytes(structure.weight_bytes)}), FF sublayers "
        f"{human_count(structure.ff_parameter_count)} ({share:.0%}), attention "
        f"{human_count(structure.attention_parameter_count)}; fingerprint {structure.fingerprint}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from layerfuse.runtime.evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        data=args.data,
        tokens=args.tokens,
        provider=args.provider,
        reference=args.reference,
        reporter=ConsoleReporter(),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console = _console()
    metric = result["metric"]
    if metric in result:
        console.print(f"{metric} on {result['data']} (test split): {result[metric]:.4g}")
    if "fidelity" in result:
        fidelity = result["fidelity"]
        console.print(
            f"vs {args.reference}: max |diff| {fidelity['max_abs_diff']:.3g}, "
            f"mean |diff| {fidelity['mean_abs_diff']:.3g}, cosine {fidelity['mean_cosine']:.5f}"
        )
    latency = result["latency_batch1"]
    console.print(
        f"latency at batch 1 {latency['input_shapes']}: p50 {latency['p50_ms']:.1f} ms, "
        f"p90 {latency['p90_ms']:.1f} ms over {latency['runs']} runs"
    )
    return 0


def _model_file_bytes(path: Path) -> int:
    from layerfuse.model.io import external_data_path

    data = external_data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _output_path(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".onnx":
        raise LayerfuseError(f"output {path} must be an .onnx file")
    return path


def _plan_path(args: argparse.Namespace, output: Path) -> Path:
    return Path(args.plan_out) if args.plan_out else output.with_suffix(".plan.json")


def _write_variant(source: str, output: Path, model, plan, plan_path: Path) -> str:
    """Save a rewritten model with its manifest and plan; describe the size change."""
    from layerfuse.model.io import save_model
    from layerfuse.model.manifest import carry_manifest
    from layerfuse.reports.tables import human_bytes

    save_model(model, output)
    carry_manifest(source, output)
    plan.save(plan_path)
    before, after = _model_file_bytes(Path(source)), _model_file_bytes(output)
    return f"files {human_bytes(before)} -> {human_bytes(after)}; wrote {output} and {plan_path}"


def _cmd_merge(args: argparse.Namespace) -> int:
    from layerfuse.passes.merge import MergePlan, MergeRequest, apply_merge_plan, plan_merge
    from layerfuse.passes.plan_io import parse_ranges
    from layerfuse.reports.tables import human_bytes, human_count

    output = _output_path(args.output)
    plan_path = _plan_path(args, output)
    if args.plan:
        plan = MergePlan.load(args.plan)
    else:
        request = MergeRequest(
            ratio=args.ratio,
            windows=args.windows,
            ranges=parse_ranges(args.blocks) if args.blocks else None,
            method=args.method,
            anchor=args.anchor,
            select=args.select,
            features=args.features,
            calib=args.calib,
            calib_tokens=args.calib_tokens,
            valid_tokens=args.valid_tokens,
            refit=args.refit,
            provider=args.provider,
        )
        plan = plan_merge(args.model, request, ConsoleReporter())
    written = _write_variant(
        args.model, output, apply_merge_plan(args.model, plan), plan, plan_path
    )
    windows = ", ".join(f"{w.blocks[0]}-{w.blocks[-1]} (anchor {w.anchor})" for w in plan.windows)
    _console().print(
        f"tied {plan.merged_blocks + len(plan.windows)} FF sublayers in windows {windows} "
        f"with the {plan.method} method; removed {human_count(plan.parameters_removed)} "
        f"parameters ({human_bytes(plan.bytes_removed)})\n{written}"
    )
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from layerfuse.passes.merge import MergePlan
    from layerfuse.passes.prune import PrunePlan, PruneRequest, apply_prune_plan, plan_prune
    from layerfuse.reports.tables import human_count

    output = _output_path(args.output)
    plan_path = _plan_path(args, output)
    if args.plan:
        plan = PrunePlan.load(args.plan)
    else:
        budget = args.params
        if args.match_plan:
            budget = MergePlan.load(args.match_plan).parameters_removed
        blocks = None
        if args.blocks:
            try:
                blocks = [int(b) for b in args.blocks.split(",")]
            except ValueError:
                raise LayerfuseError(f"--blocks '{args.blocks}' is not a list like 3,5,7") from None
        request = PruneRequest(
            target=args.target,
            count=args.count,
            parameters=budget,
            blocks=blocks,
            select=args.select,
            data=args.calib,
            tokens=args.tokens,
            provider=args.provider,
        )
        plan = plan_prune(args.model, request, ConsoleReporter())
    written = _write_variant(
        args.model, output, apply_prune_plan(args.model, plan), plan, plan_path
    )
    _console().print(
        f"pruned {plan.target} {', '.join(map(str, plan.blocks))}: removed "
        f"{human_count(plan.parameters_removed)} parameters\n{written}"
    )
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import numpy as np

    from layerfuse.data.batches import make_batches
    from layerfuse.passes.plan_io import write_json_atomic
    from layerfuse.passes.similarity import sublayer_cka
    from layerfuse.reports.plots import heatmap

    out_dir = Path(args.out) if args.out else Path(args.model).parent / "analysis"
    batches = make_batches(args.model, args.calib, "calib", tokens=args.tokens)
    result = sublayer_cka(args.model, batches, provider=args.provider, reporter=ConsoleReporter())
    write_json_atomic(
        out_dir / "cka.json", {"model": str(args.model), "data": args.calib, **result}
    )
    written = [out_dir / "cka.json"]
    for kind, title in (("ff", "FF sublayer outputs"), ("attention", "attention outputs")):
        matrix = np.asarray(result[kind]["cka"])
        if matrix.size:
            path = out_dir / f"cka_{kind}.png"
            heatmap(matrix, result[kind]["blocks"], f"Linear CKA of {title}", path, colorbar="CKA")
            written.append(path)
    console = _console()
    for kind in ("ff", "attention"):
        matrix = np.asarray(result[kind]["cka"])
        if matrix.size > 1:
            adjacent = np.diag(matrix, k=1)
            console.print(
                f"{kind}: mean CKA of adjacent blocks {adjacent.mean():.3f}, "
                f"of all pairs {matrix[np.triu_indices(len(matrix), 1)].mean():.3f}"
            )
    console.print(f"{result['tokens']} tokens; wrote {', '.join(str(p) for p in written)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from layerfuse.passes.plan_io import write_json_atomic
    from layerfuse.reports.bench import bench_figure, bench_markdown, bench_table
    from layerfuse.runtime.bench import BenchConfig, run_bench
    from layerfuse.runtime.gate import find_regressions, load_baseline, parse_tolerance
    from layerfuse.runtime.inputs import parse_shapes
    from layerfuse.runtime.session import PREPACKING

    tolerance = parse_tolerance(args.max_regression)
    baseline = load_baseline(args.baseline) if args.baseline else None
    config = BenchConfig(
        shapes=parse_shapes(args.inputs),
        provider=args.provider,
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        prepacking=PREPACKING[args.prepacking],
        memory=not args.no_memory,
        eval_data=args.eval,
        eval_tokens=args.eval_tokens,
    )
    names = args.names.split(",") if args.names else None
    document = run_bench(args.models, config, names=names, reporter=ConsoleReporter())
    console = _console()
    console.print(bench_table(document))
    if args.json:
        console.print(f"wrote {write_json_atomic(args.json, document)}")
    if args.markdown:
        Path(args.markdown).write_text(bench_markdown(document))
        console.print(f"wrote {args.markdown}")
    if args.plot:
        console.print(f"wrote {bench_figure(document, args.plot)}")
    if baseline is None:
        return 0
    regressions = find_regressions(document, baseline, tolerance)
    for regression in regressions:
        print(f"layerfuse: regression: {regression.describe()}", file=sys.stderr)
    if regressions:
        print(
            f"layerfuse: {len(regressions)} ratio(s) worse than {args.baseline} by more than "
            f"{tolerance:.0%}",
            file=sys.stderr,
        )
        return 1
    console.print(f"no ratio worse than {args.baseline} by more than {tolerance:.0%}")
    return 0


def _parse_drop_attention(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return (
            int(text)
            if "," not in text and "-" not in text
            else [int(part) for part in text.split(",")]
        )
    except ValueError:
        raise LayerfuseError(
            f"--drop-attention '{text}' is not a count, 'auto' or a list like 3,5,7"
        ) from None


def _cmd_fuse(args: argparse.Namespace) -> int:
    import numpy as np

    from layerfuse.passes.fuse import FusePlan, FuseRequest, apply_fuse_plan, plan_fuse
    from layerfuse.passes.plan_io import parse_ranges
    from layerfuse.reports.plots import bar_chart, heatmap

    output = _output_path(args.output)
    plan_path = _plan_path(args, output)
    if args.plan:
        plan = FusePlan.load(args.plan)
    else:
        request = FuseRequest(
            drop_attention=_parse_drop_attention(args.drop_attention),
            contiguous=args.contiguous,
            runs="auto" if args.runs == "auto" else parse_ranges(args.runs),
            include_last=args.include_last,
            max_dependency=args.max_dependency,
            tolerance=args.tolerance,
            data=args.calib,
            tokens=args.tokens,
            provider=args.provider,
        )
        plan = plan_fuse(args.model, request, ConsoleReporter())
    summary = _write_variant(args.model, output, apply_fuse_plan(args.model, plan), plan, plan_path)
    written = []
    for entry in plan.dependency:
        first, last = entry["run"]
        path = output.with_name(f"{output.stem}.dependency-{first}-{last}.png")
        heatmap(
            np.asarray(entry["matrix"]),
            list(range(first, last + 1)),
            f"Dependency of FFN j (col) on FFN i (row), blocks {first}-{last}",
            path,
            colorbar="mean cosine distance",
            vmax=None,
        )
        written.append(path)
    if plan.attention_scores:
        labels = [str(i) for i, s in enumerate(plan.attention_scores) if s is not None]
        values = [s for s in plan.attention_scores if s is not None]
        path = output.with_name(f"{output.stem}.attention.png")
        bar_chart(
            labels,
            {"without this attention": values},
            f"Validation {plan.metric} with one attention sublayer removed",
            plan.metric,
            path,
            reference_line=plan.baseline_score,
        )
        written.append(path)
    groups = ", ".join(f"{a}-{b}" for a, b in plan.groups) or "none"
    dropped = ", ".join(map(str, plan.drop_attention)) or "none"
    figures = f"\nwrote {', '.join(str(p) for p in written)}" if written else ""
    _console().print(
        f"removed attention of blocks {dropped}; fused FFN runs {groups}\n{summary}{figures}"
    )
    return 0


_DATA_HELP = "fortunes, random or a .txt file"
_PROVIDER_HELP = "auto, cpu or cuda"


def _rewrite_command(commands, name: str, description: str, output: str):
    """A command that reads a model, plans a rewrite and writes OUTPUT with its plan."""
    parser = commands.add_parser(name, help=description)
    parser.add_argument("model", help="the original .onnx model")
    parser.add_argument("-o", "--output", required=True, help=f"{output} (.onnx)")
    return parser


def _add_plan_options(parser) -> None:
    parser.add_argument("--calib", default="fortunes", help=_DATA_HELP)
    parser.add_argument("--plan", help="apply a saved plan instead of computing one")
    parser.add_argument("--plan-out", help="where to write the plan (default: OUTPUT.plan.json)")
    parser.add_argument("--provider", default="auto", help=_PROVIDER_HELP)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfuse",
        description="Merge and fuse feed-forward sublayers of exported transformer models.",
    )
    parser.add_argument("--version", action="version", version=f"layerfuse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser(
        "export", help="export a model to ONNX and verify it against torch"
    )
    export.add_argument(
        "source", help="packaged model (smollm2-135m, minilm-l6), HF folder or .gguf file"
    )
    export.add_argument("-o", "--output", required=True, help="folder for model.onnx")
    export.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    export.add_argument("--opset", type=int, default=18)
    export.add_argument("--task", choices=["causal-lm", "encoder", "vision"])
    export.add_argument(
        "--tolerance", type=float, default=1e-3, help="max |ORT - torch| allowed (default 1e-3)"
    )
    export.set_defaults(handler=_cmd_export)

    inspect = commands.add_parser("inspect", help="find blocks and FF sublayers in a graph")
    inspect.add_argument("model", help="an .onnx file")
    inspect.add_argument("--json", action="store_true", help="print the structure as JSON")
    inspect.set_defaults(handler=_cmd_inspect)

    evaluate = commands.add_parser(
        "evaluate", help="quality on real data and latency of a graph in onnxruntime"
    )
    evaluate.add_argument("model", help="an .onnx file with layerfuse.json beside it")
    evaluate.add_argument("--data", default="fortunes", help=_DATA_HELP)
    evaluate.add_argument("--tokens", type=int, default=8192, help="evaluation tokens")
    evaluate.add_argument("--reference", help="original graph to measure output fidelity against")
    evaluate.add_argument("--provider", default="auto", help=_PROVIDER_HELP)
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(handler=_cmd_evaluate)

    merge = _rewrite_command(
        commands,
        "merge",
        "align, average and tie consecutive FF sublayers (shared initializers)",
        "tied model",
    )
    _add_plan_options(merge)
    merge.add_argument(
        "--ratio", default="1/3", help="share of FF sublayers removed: 1/3, 0.5, all-but-one"
    )
    merge.add_argument("--windows", type=int, default=1, help="split the ratio over N windows")
    merge.add_argument("--blocks", help="explicit windows instead of --ratio, e.g. 3-8,12-15")
    merge.add_argument("--method", default="permute", choices=["permute", "vanilla"])
    merge.add_argument("--anchor", default="first", choices=["first", "middle", "last"])
    merge.add_argument(
        "--select",
        default="sliding",
        choices=["sliding", "last"],
        help="sliding: best window by validation score; last: the last blocks",
    )
    merge.add_argument(
        "--features",
        default="pre_activation",
        choices=["pre_activation", "hidden"],
        help="activations aligned on (the paper: before the nonlinearity)",
    )
    merge.add_argument("--calib-tokens", type=int, default=10240)
    merge.add_argument("--valid-tokens", type=int, default=4096)
    merge.add_argument(
        "--refit", action="store_true", help="least-squares refit of the shared down-projection"
    )
    merge.set_defaults(handler=_cmd_merge)

    prune = _rewrite_command(
        commands,
        "prune",
        "drop blocks or sublayers (the baseline merging is judged against)",
        "pruned model",
    )
    _add_plan_options(prune)
    prune.add_argument("--target", default="block", choices=["block", "ff", "attention"])
    budget = prune.add_mutually_exclusive_group()
    budget.add_argument("--count", type=int, help="how many blocks or sublayers to drop")
    budget.add_argument("--params", type=int, help="parameters to remove (rounded to units)")
    budget.add_argument("--match-plan", help="remove as many parameters as this merge plan")
    budget.add_argument("--blocks", help="explicit block indices, e.g. 3,5,7")
    prune.add_argument("--select", default="influence", choices=["influence", "sliding"])
    prune.add_argument("--tokens", type=int, default=4096)
    prune.set_defaults(handler=_cmd_prune)

    analyze = commands.add_parser(
        "analyze", help="CKA between every pair of FF and of attention sublayer outputs"
    )
    analyze.add_argument("model", help="an .onnx file with layerfuse.json beside it")
    analyze.add_argument("--calib", default="fortunes", help=_DATA_HELP)
    analyze.add_argument("--tokens", type=int, default=4096)
    analyze.add_argument("--out", help="output folder (default: MODEL_DIR/analysis)")
    analyze.add_argument("--provider", default="auto", help=_PROVIDER_HELP)
    analyze.set_defaults(handler=_cmd_analyze)

    fuse = _rewrite_command(
        commands,
        "fuse",
        "remove attention and fuse runs of FFN-only blocks into one wide FFN",
        "fused model",
    )
    _add_plan_options(fuse)
    fuse.add_argument(
        "--drop-attention",
        help="N least important attention sublayers, 'auto', or explicit blocks like 3,5,7",
    )
    fuse.add_argument(
        "--contiguous",
        action="store_true",
        help="drop N consecutive attention sublayers (best window) so one long run appears",
    )
    fuse.add_argument("--runs", default="auto", help="'auto' or block ranges like 10-14,20-23")
    fuse.add_argument(
        "--include-last",
        action="store_true",
        help="also fuse the last FFN of each run (the paper leaves it out)",
    )
    fuse.add_argument(
        "--max-dependency", type=float, help="split runs where a block depends more than this"
    )
    fuse.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="with --drop-attention auto: allowed relative validation loss (default 0.1)",
    )
    fuse.add_argument("--tokens", type=int, default=2048)
    fuse.set_defaults(handler=_cmd_fuse)

    bench = commands.add_parser(
        "bench", help="latency, memory, size and quality of graphs side by side"
    )
    bench.add_argument("models", nargs="+", help="the reference graph first, then variants")
    bench.add_argument("--names", help="comma-separated names for the graphs")
    bench.add_argument(
        "--inputs", default="1x32,1x128", help="BATCHxSEQUENCE shapes, e.g. 1x32,8x512"
    )
    bench.add_argument("--provider", default="auto", help=_PROVIDER_HELP)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--runs", type=int, default=20)
    bench.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's)")
    bench.add_argument(
        "--prepacking",
        default="auto",
        choices=["auto", "on", "off"],
        help="CPU MatMul weight pre-packing; auto turns it off where weights are shared",
    )
    bench.add_argument("--no-memory", action="store_true", help="skip memory measurement")
    bench.add_argument("--eval", help="quality data (fortunes, random or a .txt file)")
    bench.add_argument("--eval-tokens", type=int, default=8192)
    bench.add_argument("--json", help="write the result JSON here")
    bench.add_argument("--markdown", help="write a Markdown table here")
    bench.add_argument("--plot", help="write a PNG bar chart here")
    bench.add_argument("--baseline", help="a previous --json result to gate against")
    bench.add_argument(
        "--max-regression", default="10%", help="allowed worsening of any ratio (default 10%%)"
    )
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except LayerfuseError as exc:
        if args.debug:
            raise
        print(f"layerfuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerfuse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
