"""``layerfuse quantize`` and ``layerfuse convert``: onnxruntime's own quantizers, fp16
converter and transformers optimizer, with every tie of the source proven kept.

Quantization has its own command because it is the step users reach for (and the one whose
quantizers were written per node); fp16 and the optimizer are format conversions that share
one command, ``convert``. Both refuse to write an output in which a tied set became several
initializers (exit 2, nothing written).
"""

from __future__ import annotations

__all__ = ["register"]

import argparse

from layerfuse.cli.common import console, output_path


def _report(result) -> int:
    from layerfuse.reports.tables import human_bytes

    out = console()
    kept = f"{result.ties_kept} of {len(result.ties)} tied sets kept as one initializer each"
    out.print(
        f"wrote {result.path} ({result.kind}); unique weights "
        f"{human_bytes(result.source_unique_bytes)} -> {human_bytes(result.unique_bytes)}; "
        + (kept if result.ties else "no tied weights")
    )
    if result.details.get("embeddings"):
        out.print(f"tied word embeddings {result.details['embeddings']}: one quantized table")
    if result.details.get("fused"):
        fused = ", ".join(f"{op} x{n}" for op, n in result.details["fused"].items())
        out.print(f"optimizer fusions: {fused}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from layerfuse.toolchain import quantize_model

    scheme = "int4" if args.int4 else "int8"
    return _report(
        quantize_model(
            args.model,
            output_path(args.output),
            scheme,
            block_size=args.block_size,
            accuracy_level=args.accuracy_level,
            embeddings=not args.float_embeddings,
        )
    )


def _convert(args: argparse.Namespace) -> int:
    from layerfuse.toolchain import convert_fp16, optimize

    out = output_path(args.output)
    if args.fp16:
        return _report(convert_fp16(args.model, out))
    return _report(optimize(args.model, out, model_type=args.model_type, opt_level=args.opt_level))


def register(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="int8/int4 weight quantization that keeps tied weights shared"
    )
    quantize.add_argument("model", help="the .onnx model (original, tied or fused)")
    quantize.add_argument("-o", "--output", required=True, help="the quantized .onnx")
    scheme = quantize.add_mutually_exclusive_group(required=True)
    scheme.add_argument(
        "--int8", action="store_true", help="dynamic int8 MatMuls (quantize_dynamic)"
    )
    scheme.add_argument(
        "--int4", action="store_true", help="block-wise int4 MatMulNBits (weights only)"
    )
    quantize.add_argument(
        "--block-size", type=int, default=32, help="int4: weights per scale (default 32)"
    )
    quantize.add_argument(
        "--accuracy-level",
        type=int,
        choices=[1, 2, 3, 4],
        help="int4: MatMulNBits compute type (4 = int8 compute, fastest on CPU)",
    )
    quantize.add_argument(
        "--float-embeddings",
        action="store_true",
        help="leave tied word embeddings float32 (default: quantized once for lookup and logits)",
    )
    quantize.set_defaults(handler=_quantize)

    convert = commands.add_parser(
        "convert", help="fp16 or the onnxruntime transformers optimizer, ties kept"
    )
    convert.add_argument("model", help="the .onnx model (original, tied or fused)")
    convert.add_argument("-o", "--output", required=True, help="the converted .onnx")
    target = convert.add_mutually_exclusive_group(required=True)
    target.add_argument("--fp16", action="store_true", help="float16 weights and compute (CUDA)")
    target.add_argument(
        "--optimize", action="store_true", help="onnxruntime.transformers optimize_model"
    )
    convert.add_argument(
        "--model-type",
        help="optimizer fusion set (default: gpt2 for causal LMs, bert for encoders)",
    )
    convert.add_argument(
        "--opt-level",
        type=int,
        default=0,
        choices=[0, 1, 2, 99],
        help="optimizer: 0 = its fusions only (default); >0 also onnxruntime's offline passes",
    )
    convert.set_defaults(handler=_convert)
