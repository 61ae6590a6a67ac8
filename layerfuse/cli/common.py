"""What every command shares: the console, and one spelling of each common option.

Options mean the same on every command: ``--data`` is where text comes from (fortunes,
random, a .txt/.jsonl file), token budgets are named by the split they draw from
(``--calib-tokens``, ``--valid-tokens``, ``--eval-tokens``), ``--provider`` picks the
onnxruntime device.
"""

from __future__ import annotations

__all__ = [
    "add_data_options",
    "add_provider_option",
    "console",
    "data_settings",
    "output_path",
]

import argparse
import sys
from pathlib import Path

from layerfuse.errors import LayerfuseError
from layerfuse.passes.planner import DataSettings

DATA_HELP = (
    "text to calibrate and validate on: fortunes (Debian's fortunes, the default), random "
    "(random token ids or pixels, for smoke tests only), or a .txt/.jsonl file"
)


def console():
    from rich.console import Console

    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def add_provider_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provider",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="onnxruntime device: auto takes CUDA when onnxruntime-gpu has it (default auto)",
    )


def add_data_options(
    parser: argparse.ArgumentParser, *, calib_tokens: int, valid_tokens: int | None
) -> None:
    """``--data``, ``--calib-tokens``, [``--valid-tokens``], ``--seq-len``, ``--provider``."""
    parser.add_argument("--data", default="fortunes", help=DATA_HELP)
    parser.add_argument(
        "--calib-tokens",
        type=int,
        default=calib_tokens,
        help=f"tokens of the calib split to calibrate on (default {calib_tokens})",
    )
    if valid_tokens is not None:
        parser.add_argument(
            "--valid-tokens",
            type=int,
            default=valid_tokens,
            help=f"tokens of the valid split candidates are scored on (default {valid_tokens})",
        )
    parser.add_argument(
        "--seq-len", type=int, default=128, help="tokens per sequence (default 128)"
    )
    add_provider_option(parser)


def data_settings(args: argparse.Namespace) -> DataSettings:
    return DataSettings(
        data=args.data,
        calib_tokens=args.calib_tokens,
        valid_tokens=getattr(args, "valid_tokens", args.calib_tokens),
        seq_len=args.seq_len,
        provider=args.provider,
    )


def output_path(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".onnx":
        raise LayerfuseError(f"output {path} must be an .onnx file")
    return path
