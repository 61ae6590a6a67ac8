"""``layerfuse export``: torch/Hugging Face model -> verified ONNX folder.

Everything the options decide (the task, whether the generation signature can be exported)
is checked before the weights load: loading a real model takes minutes, and an option that
cannot work must not cost them.
"""

from __future__ import annotations

__all__ = ["register"]

import argparse

from layerfuse.cli.common import console
from layerfuse.errors import LayerfuseError
from layerfuse.progress import ConsoleReporter


def _run(args: argparse.Namespace) -> int:
    from layerfuse.export.onnx_export import check_export_options, export_model
    from layerfuse.export.sources import load_source, resolve_source

    resolved = resolve_source(args.source, task=args.task, kv_cache=args.kv_cache)
    check_export_options(resolved.task, args.exporter, args.opset, args.kv_cache)
    if args.bos is not None and resolved.task != "causal-lm":
        raise LayerfuseError(
            f"--bos/--no-bos choose how causal LMs' text windows start; this is a "
            f"{resolved.task} model, whose tokenizer adds its own special tokens"
        )
    out = console()
    if resolved.task_note:
        out.print(f"note: {resolved.task_note}")
    reporter = ConsoleReporter()
    reporter.step(f"loading {resolved.origin} (task {resolved.task})")
    source = load_source(resolved)
    if args.bos is not None:
        source.bos = args.bos
    result = export_model(
        source,
        args.output,
        exporter=args.exporter,
        opset=args.opset,
        tolerance=args.tolerance,
        kv_cache=args.kv_cache,
        reporter=reporter,
    )
    fed = (
        ""
        if source.bos is None
        else f"; text windows {'start' if source.bos else 'do not start'} with BOS"
    )
    out.print(
        f"wrote {result.model_path} ({source.task}, {args.exporter} exporter) in "
        f"{result.seconds:.0f} s; max |onnxruntime - torch| = {result.max_abs_diff:.2e} "
        f"(tolerance {args.tolerance:g}){fed}"
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
        help="graph signature (default: from the model's config; a .gguf file or --kv-cache: "
        "causal-lm)",
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
    parser.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="causal LMs: start every packed text window (calibration, window selection, "
        "evaluation) with the BOS token (default: when the tokenizer adds BOS to a text); "
        "recorded as 'bos' in layerfuse.json",
    )
    parser.set_defaults(handler=_run)
