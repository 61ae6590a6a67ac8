"""``layerfuse prune``: drop blocks or sublayers, the baseline merging is judged against."""

from __future__ import annotations

__all__ = ["COMMAND"]

import argparse

from layerfuse.cli.common import data_settings, positive_int
from layerfuse.cli.rewrite import RewriteCommand


def _prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default="block",
        choices=["block", "ff", "attention"],
        help="what to drop: whole blocks, FF sublayers or attention sublayers",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--count", type=positive_int, help="how many blocks or sublayers to drop")
    budget.add_argument(
        "--params", type=positive_int, help="parameters to remove (rounded to units)"
    )
    budget.add_argument("--match-plan", help="remove as many parameters as this merge plan removes")
    budget.add_argument("--blocks", help="explicit blocks, e.g. 3,5-7")
    parser.add_argument(
        "--select",
        default="influence",
        choices=["influence", "sliding"],
        help="influence: least ShortGPT block influence; sliding: best contiguous run on "
        "validation",
    )


def _prune_request(args: argparse.Namespace):
    from layerfuse.passes.blocks import parse_blocks
    from layerfuse.passes.merge import MergePlan
    from layerfuse.passes.prune import PruneRequest

    budget = MergePlan.load(args.match_plan).parameters_removed if args.match_plan else args.params
    request = PruneRequest(
        target=args.target,
        count=args.count,
        parameters=budget,
        blocks=parse_blocks(args.blocks) if args.blocks else None,
        select=args.select,
        data=data_settings(args),
    )
    return request


def _prune_summary(plan) -> str:
    return f"pruned {plan.target} {', '.join(map(str, plan.blocks))}"


def _prune_plan_class():
    from layerfuse.passes.prune import PrunePlan

    return PrunePlan


COMMAND = RewriteCommand(
    "prune",
    "drop blocks or sublayers (the baseline merging is judged against)",
    _prune_plan_class,
    _prune_options,
    _prune_request,
    _prune_summary,
    calib_tokens=4096,
    valid_tokens=4096,
    planner="plan_prune",
)
