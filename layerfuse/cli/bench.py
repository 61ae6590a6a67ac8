"""``layerfuse bench``: graphs side by side, and the ratio regression gate for CI."""

from __future__ import annotations

__all__ = ["register"]

import argparse
import sys
from pathlib import Path

from layerfuse.cli.common import DATA_HELP, add_provider_option, console, model_file, positive_int
from layerfuse.progress import ConsoleReporter


def _run(args: argparse.Namespace) -> int:
    from layerfuse.files import (
        check_writable,
        refuse_overwriting_inputs,
        write_json_atomic,
        write_text_atomic,
    )
    from layerfuse.model.publish import model_files
    from layerfuse.reports.bench_render import bench_figure, bench_markdown, bench_table
    from layerfuse.runtime.bench import BenchConfig, run_bench
    from layerfuse.runtime.gate import find_regressions, load_baseline, parse_tolerance
    from layerfuse.runtime.inputs import parse_shapes
    from layerfuse.runtime.session import PREPACKING

    tolerance = parse_tolerance(args.max_regression)
    baseline = load_baseline(args.baseline) if args.baseline else None
    outputs = [check_writable(path) for path in (args.json, args.markdown, args.plot) if path]
    inputs = [file for model in args.models for file in model_files(model)]
    refuse_overwriting_inputs(inputs + ([Path(args.baseline)] if args.baseline else []), outputs)
    config = BenchConfig(
        shapes=parse_shapes(args.inputs),
        provider=args.provider,
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        prepacking=PREPACKING[args.prepacking],
        memory=not args.no_memory,
        eval_data=args.data if args.eval else None,
        eval_tokens=args.eval_tokens,
    )
    names = args.names.split(",") if args.names else None
    document = run_bench(args.models, config, names=names, reporter=ConsoleReporter())
    out = console()
    out.print(bench_table(document))
    if args.json:
        out.print(f"wrote {write_json_atomic(args.json, document)}")
    if args.markdown:
        out.print(f"wrote {write_text_atomic(args.markdown, bench_markdown(document))}")
    if args.plot:
        out.print(f"wrote {bench_figure(document, args.plot)}")
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
    out.print(f"no ratio worse than {args.baseline} by more than {tolerance:.0%}")
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "bench", help="latency, memory, size and quality of graphs side by side"
    )
    parser.add_argument(
        "models", nargs="+", type=model_file, help="the reference graph first, then variants"
    )
    parser.add_argument("--names", help="comma-separated names for the graphs")
    parser.add_argument(
        "--inputs", default="1x32,1x128", help="BATCHxSEQUENCE shapes, e.g. 1x32,8x512"
    )
    add_provider_option(parser)
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed runs per graph and shape (default 3)"
    )
    parser.add_argument(
        "--runs", type=positive_int, default=20, help="timed runs per graph and shape (default 20)"
    )
    parser.add_argument(
        "--threads", type=positive_int, help="intra-op threads (default: onnxruntime's)"
    )
    parser.add_argument(
        "--prepacking",
        default="auto",
        choices=["auto", "on", "off"],
        help="CPU MatMul weight pre-packing; auto follows layerfuse's policy",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip memory measurement")
    parser.add_argument(
        "--eval", action="store_true", help="also measure quality on the test split of --data"
    )
    parser.add_argument("--data", default="fortunes", help=DATA_HELP)
    parser.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=8192,
        help="tokens of the test split (default 8192)",
    )
    parser.add_argument("--json", help="write the result JSON here")
    parser.add_argument("--markdown", help="write a Markdown table here")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    parser.add_argument("--baseline", help="a previous --json result to gate against")
    parser.add_argument(
        "--max-regression", default="10%", help="allowed worsening of any ratio (default 10%%)"
    )
    parser.set_defaults(handler=_run)
