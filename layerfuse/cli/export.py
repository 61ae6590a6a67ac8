"""``layerfuse export``: torch/Hugging Face model -> verified ONNX folder."""

from __future__ import annotations

__all__ = ["register"]

import argparse

from layerfuse.cli.common import console
from layerfuse.progress import ConsoleReporter


def _run(args: argparse.Namespace) -> int:
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
        kv_cache=args.kv_cache,
        reporter=reporter,
    )
    console().print(
        f"wrote {result.model_path} ({source.task}, {args.exporter} exporter) in "
        f"{result.seconds:.0f} s; max |onnxruntime - torch| = {result.max_abs_diff:.2e} "
        f"(tolerance {args.tolerance:g})"
    )
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "export", help="export a model to ONNX and verify it against torch"
    )
    parser.add_argument(
        "source", help="packaged model (smollm2-135m, minilm-l6), HF folder or .gguf file"
    )
    parser.add_argument("-o", "--output", required=True, help="folder for model.onnx")
    parser.add_argument(
        "--exporter",
        default="dynamo",
        choices=["dynamo", "torchscript"],
        help="torch.onnx exporter (default dynamo)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--task",
        choices=["causal-lm", "encoder", "vision"],
        help="graph signature (default: from the model's config)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="max |ORT - torch| allowed (default 1e-3)"
    )
    parser.add_argument(
        "--kv-cache",
        action="store_true",
        help="causal LMs: export the generation signature (past key/value inputs, present "
        "outputs, position_ids) for 'layerfuse generate'; verified on a prefill and a decode "
        "step",
    )
    parser.set_defaults(handler=_run)
