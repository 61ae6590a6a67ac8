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
    "model_file",
    "output_path",
    "positive_float",
    "positive_int",
    "refuse_bad_numbers",
]

import argparse
import math
import sys
from pathlib import Path

from layerfuse.errors import LayerfuseError
from layerfuse.options import check_number
from layerfuse.passes.planner import DataSettings

DATA_HELP = (
    "text to calibrate and validate on: fortunes (Debian's fortunes, the default), random "
    "(random token ids or pixels, for smoke tests only), or a .txt/.jsonl file; "
    "+gcide/+pydocs (e.g. fortunes+gcide) add Debian's dictionary and Python docs to the "
    "training split only"
)


def positive_int(text: str) -> int:
    """argparse type for counts where zero means nothing (tokens, steps, batch sizes)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type for rates and scales: finite and above zero."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, not {text}")
    return value


def refuse_bad_numbers(args: argparse.Namespace) -> None:
    """The rule every numeric option obeys: finite and not negative (``--threads -1``,
    ``--lr nan``); options where zero means nothing declare :func:`positive_int` too."""
    for name, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        check_number("--" + name.replace("_", "-"), value)


def model_file(text: str) -> Path:
    """argparse type for a model argument: checked before any command reads it."""
    from layerfuse.model.io import check_model_file

    try:
        return check_model_file(text)
    except LayerfuseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        type=positive_int,
        default=calib_tokens,
        help=f"tokens of the calib split to calibrate on (default {calib_tokens})",
    )
    if valid_tokens is not None:
        parser.add_argument(
            "--valid-tokens",
            type=positive_int,
            default=valid_tokens,
            help=f"tokens of the valid split candidates are scored on (default {valid_tokens})",
        )
    parser.add_argument(
        "--seq-len", type=positive_int, default=128, help="tokens per sequence (default 128)"
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
