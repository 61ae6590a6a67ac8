"""``layerfuse analyze``: CKA between every pair of FF and of attention sublayer outputs."""

from __future__ import annotations

__all__ = ["register"]

import argparse
from pathlib import Path

from layerfuse.cli.common import add_data_options, console, model_file
from layerfuse.progress import ConsoleReporter


def _run(args: argparse.Namespace) -> int:
    from layerfuse.data.batches import make_batches
    from layerfuse.files import write_json_atomic
    from layerfuse.passes.similarity import sublayer_cka
    from layerfuse.reports.figures import cka_figures, cka_summary

    out_dir = Path(args.out) if args.out else Path(args.model).parent / "analysis"
    batches = make_batches(
        args.model, args.data, "calib", tokens=args.calib_tokens, seq_len=args.seq_len
    )
    result = sublayer_cka(args.model, batches, provider=args.provider, reporter=ConsoleReporter())
    written = [
        write_json_atomic(
            out_dir / "cka.json", {"model": str(args.model), "data": args.data, **result}
        ),
        *cka_figures(result, out_dir),
    ]
    out = console()
    for line in cka_summary(result):
        out.print(line)
    out.print(f"{result['tokens']} tokens; wrote {', '.join(str(p) for p in written)}")
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "analyze", help="CKA between every pair of FF and of attention sublayer outputs"
    )
    parser.add_argument(
        "model", type=model_file, help="an .onnx file with layerfuse.json beside it"
    )
    add_data_options(parser, calib_tokens=4096, valid_tokens=None)
    parser.add_argument("--out", help="output folder (default: MODEL_DIR/analysis)")
    parser.set_defaults(handler=_run)
