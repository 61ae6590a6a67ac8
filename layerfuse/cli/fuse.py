"""``layerfuse fuse``: remove attention and fuse FFN-only runs into one wide FFN."""

from __future__ import annotations

__all__ = ["COMMAND"]

import argparse
from pathlib import Path

from layerfuse.cli.common import data_settings
from layerfuse.cli.rewrite import RewriteCommand
from layerfuse.errors import LayerfuseError


def _fuse_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drop-attention",
        help="attention sublayers to remove: a count N (the least important), 'auto' (while "
        "validation stays within --tolerance) or explicit blocks like 3,5-7",
    )
    parser.add_argument(
        "--contiguous",
        action="store_true",
        help="drop N consecutive attention sublayers (best window) so one long run appears",
    )
    parser.add_argument(
        "--runs", default="auto", help="what to fuse: 'auto' or block ranges like 10-14,20-23"
    )
    parser.add_argument(
        "--include-last",
        action="store_true",
        help="also fuse the last FFN of each run (the paper leaves it out)",
    )
    parser.add_argument(
        "--max-dependency",
        type=float,
        help="split runs where a block depends on an earlier one more than this",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="with --drop-attention auto: allowed relative validation loss (default 0.1)",
    )


def _drop_attention(text: str | None) -> int | str | list[int] | None:
    from layerfuse.passes.blocks import parse_blocks

    if text is None or text == "auto":
        return text
    if text.isdigit():
        return int(text)
    return parse_blocks(text)


def _fuse_request(args: argparse.Namespace):
    from layerfuse.passes.blocks import parse_ranges
    from layerfuse.passes.fuse import FuseRequest

    request = FuseRequest(
        drop_attention=_drop_attention(args.drop_attention),
        contiguous=args.contiguous,
        fuse="auto" if args.runs == "auto" else parse_ranges(args.runs),
        include_last=args.include_last,
        max_dependency=args.max_dependency,
        tolerance=args.tolerance,
        data=data_settings(args),
    )
    if args.contiguous and not isinstance(request.drop_attention, int):
        raise LayerfuseError("--contiguous needs --drop-attention N (a count)")
    return request


def _fuse_summary(plan) -> str:
    fused = ", ".join(f"{a}-{b}" for a, b in plan.fuse) or "none"
    dropped = ", ".join(map(str, plan.drop_attention)) or "none"
    return f"removed attention of blocks {dropped}; fused FFN runs {fused}"


def _fuse_figures(plan, stem: Path) -> list[Path]:
    from layerfuse.reports.figures import fusion_figures

    return fusion_figures(plan, stem)


def _fuse_plan_class():
    from layerfuse.passes.fuse import FusePlan

    return FusePlan


COMMAND = RewriteCommand(
    "fuse",
    "remove attention and fuse runs of FFN-only blocks into one wide FFN",
    _fuse_plan_class,
    _fuse_options,
    _fuse_request,
    _fuse_summary,
    calib_tokens=2048,
    valid_tokens=2048,
    figures=_fuse_figures,
    planner="plan_fuse",
)
