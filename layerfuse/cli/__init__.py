"""``layerfuse``: the command line.

Every command reports user mistakes as one ``layerfuse: error: ...`` line on stderr with exit
status 2; an error nothing foresaw is one line too, with exit status 3 (``--debug`` shows its
traceback). Progress goes to stderr so that ``--json`` output on stdout stays machine-readable.
Each command lives in its own module with a ``register(subparsers)`` function.
"""

from __future__ import annotations

__all__ = ["build_parser", "main"]

import argparse
import errno
import sys
from collections.abc import Sequence

from layerfuse import __version__
from layerfuse.cli import (
    analyze,
    bench,
    deploy,
    evaluate,
    export,
    fuse,
    generate,
    inspect,
    merge,
    optimize,
    prune,
    quantize,
    recover,
    serve,
    share_kv,
)
from layerfuse.cli.common import refuse_bad_numbers
from layerfuse.cli.rewrite import register_rewrite
from layerfuse.errors import LayerfuseError

_COMMAND_MODULES = (
    export,
    inspect,
    evaluate,
    analyze,
    bench,
    quantize,
    deploy,
    serve,
    generate,
    recover,
    optimize,
)
# Rewriting commands: a RewriteCommand each, registered by one driver.
_REWRITE_MODULES = (merge, prune, fuse, share_kv)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other layerfuse error (``--help`` shows
    the usage)."""

    def error(self, message: str):
        self.exit(2, f"layerfuse: error: {self.prog.removeprefix('layerfuse ')}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="layerfuse",
        description="Merge, fuse and prune feed-forward sublayers of exported transformer "
        "models at the ONNX level, and measure the result.",
    )
    parser.add_argument("--version", action="version", version=f"layerfuse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(commands)
    for module in _REWRITE_MODULES:
        register_rewrite(commands, module.COMMAND)
    return parser


# The machine's limits, not layerfuse's bugs: outputs are staged, so nothing half-written is
# published when one of these stops a write.
_MACHINE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EMFILE: "too many open files",
}


def describe_unexpected(exc: Exception) -> str:
    """One line for an error no check foresaw: onnxruntime's own complaint about a graph or
    a shape, and the machine's limits (a full disk), are the user's to read; anything else
    is a layerfuse bug to report."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if type(exc).__module__.startswith("onnxruntime"):
        return f"onnxruntime: {first_line}"
    if isinstance(exc, OSError) and exc.errno in _MACHINE_ERRORS:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{_MACHINE_ERRORS[exc.errno]}{where}; nothing half-written was published"
    return (
        f"unexpected {type(exc).__name__}: {first_line} (a layerfuse bug: please report it "
        f"with the output of --debug)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        refuse_bad_numbers(args)
        return args.handler(args)
    except LayerfuseError as exc:
        if args.debug:
            raise
        print(f"layerfuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerfuse: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last net: one line, never a traceback dump
        if args.debug:
            raise
        print(f"layerfuse: error: {describe_unexpected(exc)}", file=sys.stderr)
        return 3
