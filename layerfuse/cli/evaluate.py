"""``layerfuse evaluate``: quality on held-out real data, fidelity to a reference, latency."""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json

from layerfuse.cli.common import DATA_HELP, add_provider_option, console, model_file, positive_int
from layerfuse.progress import ConsoleReporter


def _run(args: argparse.Namespace) -> int:
    from layerfuse.runtime.evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        data=args.data,
        tokens=args.eval_tokens,
        provider=args.provider,
        reference=args.reference,
        reporter=ConsoleReporter(),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    out = console()
    metric = result["metric"]
    if metric in result:
        out.print(f"{metric} on {result['data']} (test split): {result[metric]:.4g}")
    if "fidelity" in result:
        fidelity = result["fidelity"]
        out.print(
            f"vs {args.reference}: max |diff| {fidelity['max_abs_diff']:.3g}, "
            f"mean |diff| {fidelity['mean_abs_diff']:.3g}, cosine {fidelity['mean_cosine']:.5f}"
        )
    latency = result["latency_batch1"]
    out.print(
        f"latency at batch 1 {latency['input_shapes']}: p50 {latency['p50_ms']:.1f} ms, "
        f"p90 {latency['p90_ms']:.1f} ms over {latency['runs']} runs"
    )
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="quality on real data and latency of a graph in onnxruntime"
    )
    parser.add_argument(
        "model", type=model_file, help="an .onnx file with layerfuse.json beside it"
    )
    parser.add_argument("--data", default="fortunes", help=DATA_HELP)
    parser.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=8192,
        help="tokens of the test split (default 8192)",
    )
    parser.add_argument(
        "--reference", type=model_file, help="original graph to measure output fidelity against"
    )
    add_provider_option(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_run)
