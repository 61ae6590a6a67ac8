"""``layerfuse merge``: aligned FF merging (permute, average, tie)."""

from __future__ import annotations

__all__ = ["COMMAND"]

import argparse

from layerfuse.cli.common import data_settings, positive_int
from layerfuse.cli.rewrite import RewriteCommand


def _merge_options(parser: argparse.ArgumentParser) -> None:
    from layerfuse.passes.merge.plan import ANCHORS, FEATURES, METHODS, RELAX_INITS

    parser.add_argument(
        "--ratio", default="1/3", help="share of FF sublayers removed: 1/3, 0.5, all-but-one"
    )
    parser.add_argument(
        "--windows", type=positive_int, default=1, help="split the ratio over N windows"
    )
    parser.add_argument("--blocks", help="explicit windows instead of --ratio, e.g. 3-8,12-15")
    parser.add_argument(
        "--method",
        default="permute",
        choices=METHODS,
        help="permute: align neurons to the anchor before averaging (the paper); vanilla: "
        "average as they are",
    )
    parser.add_argument(
        "--anchor", default="first", choices=ANCHORS, help="the FF others are aligned to"
    )
    parser.add_argument(
        "--select",
        default="sliding",
        choices=["sliding", "last"],
        help="sliding: the window position with the best validation score; last: the last blocks",
    )
    parser.add_argument(
        "--features",
        default="pre_activation",
        choices=FEATURES,
        help="tensor neurons are aligned on: pre_activation (before the nonlinearity: the "
        "gate output of gated FFs; default), up (the up-projection output, as the paper's "
        "code does for SwiGLU), hidden (what the down-projection reads)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="least-squares refit of the shared down-projection, kept if validation improves",
    )
    parser.add_argument(
        "--relax-rank",
        type=int,
        default=0,
        metavar="R",
        help="relaxed tie: each tied layer adds its own rank-R delta to every shared "
        "projection (R * (in + out) parameters each; 0, the default, ties plainly)",
    )
    parser.add_argument(
        "--relax-init",
        default="svd",
        choices=RELAX_INITS,
        help="svd: each delta starts as the best rank-R correction toward the layer's own "
        "weights (default); zero: deltas start at zero (the plain tie's outputs, trainable)",
    )


def _merge_request(args: argparse.Namespace):
    from layerfuse.passes.blocks import parse_ranges
    from layerfuse.passes.merge import MergeRequest

    request = MergeRequest(
        ratio=args.ratio,
        windows=args.windows,
        ranges=parse_ranges(args.blocks) if args.blocks else None,
        method=args.method,
        anchor=args.anchor,
        select=args.select,
        features=args.features,
        refit=args.refit,
        data=data_settings(args),
        relax_rank=args.relax_rank,
        relax_init=args.relax_init,
    )
    return request


def _merge_summary(plan) -> str:
    windows = ", ".join(f"{w.blocks[0]}-{w.blocks[-1]} (anchor {w.anchor})" for w in plan.windows)
    summary = (
        f"tied {plan.merged_blocks + len(plan.windows)} FF sublayers in windows {windows} "
        f"with the {plan.method} method"
    )
    if plan.relax_rank:
        summary += f", relaxed with rank-{plan.relax_rank} per-layer deltas ({plan.relax_init})"
        if plan.parameters_removed <= 0:
            summary += (
                f"\nwarning: the deltas add {-plan.parameters_removed} parameters more than the "
                "tie removes; use a smaller --relax-rank"
            )
    return summary + _validation_note(plan.validation)


# Validation perplexity this many times the original's means the merge broke the model.
_BROKEN_RATIO = 3.0


def _validation_note(validation: dict | None) -> str:
    """What merging did to validation quality, said plainly when it broke the model."""
    if not validation or validation["metric"] != "perplexity":
        return ""
    before, after = validation["original"], validation["merged"]
    note = f"\nvalidation perplexity {before:.4g} -> {after:.4g} ({after / before:.2f}x)"
    if after > _BROKEN_RATIO * before:
        note += (
            "\nwarning: the merged model is much worse than the original; merge fewer FFs "
            "(a smaller --ratio or --blocks), try --refit, and train it back with "
            "'layerfuse recover' before using it"
        )
    return note


def _merge_plan_class():
    from layerfuse.passes.merge import MergePlan

    return MergePlan


COMMAND = RewriteCommand(
    "merge",
    "align, average and tie consecutive FF sublayers (shared initializers)",
    _merge_plan_class,
    _merge_options,
    _merge_request,
    _merge_summary,
    calib_tokens=10240,
    valid_tokens=4096,
    planner="plan_merge",
)
