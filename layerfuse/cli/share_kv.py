"""``layerfuse share-kv``: later attention layers read earlier layers' keys and values."""

from __future__ import annotations

__all__ = ["COMMAND"]

import argparse
import re

from layerfuse.cli.common import data_settings
from layerfuse.cli.rewrite import RewriteCommand
from layerfuse.errors import LayerfuseError

_PAIR = re.compile(r"^\s*(\d+)\s*<-\s*(\d+)\s*$")


def _layers(text: str) -> str | int | list[tuple[int, int]]:
    """``auto``, a count, or ``"5<-4,7<-6"`` (layer 5 reads layer 4's keys and values)."""
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    pairs = []
    for part in text.split(","):
        match = _PAIR.match(part)
        if match is None:
            raise LayerfuseError(
                f"--layers '{text}': give auto, a count, or pairs such as 5<-4,7<-6"
            )
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layers",
        default="auto",
        help="auto (as many as validation allows within --tolerance), N layers, or pairs "
        "TARGET<-SOURCE such as 5<-4,7<-6 (default auto)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="with --layers auto: allowed relative worsening of validation (default 0.1)",
    )
    parser.add_argument(
        "--no-align",
        dest="align",
        action="store_false",
        help="share the keys and values as they are, without fitting each pair's alignment "
        "(folded into the reading layer's query and output projections) on calibration text",
    )


def _request(args: argparse.Namespace):
    from layerfuse.passes.share_kv import ShareKVRequest

    return ShareKVRequest(
        layers=_layers(args.layers),
        tolerance=args.tolerance,
        align=args.align,
        data=data_settings(args),
    )


def _summary(plan) -> str:
    pairs = ", ".join(f"{t}<-{s}" for t, s in plan.pairs)
    kept = plan.num_kv_layers - len(plan.pairs)
    return (
        f"shared keys and values {pairs}; KV cache per token: {kept} of {plan.num_kv_layers} "
        f"layers keep one ({kept / plan.num_kv_layers:.0%} of the original's bytes)"
    )


def _figures(plan, stem):
    from layerfuse.reports.figures import kv_similarity_figure

    return kv_similarity_figure(plan, stem)


def _plan_class():
    from layerfuse.passes.share_kv import ShareKVPlan

    return ShareKVPlan


COMMAND = RewriteCommand(
    "share-kv",
    "let later attention layers read earlier layers' keys and values (a smaller KV cache)",
    _plan_class,
    _options,
    _request,
    _summary,
    calib_tokens=1024,
    valid_tokens=2048,
    figures=_figures,
    planner="plan_share_kv",
)
