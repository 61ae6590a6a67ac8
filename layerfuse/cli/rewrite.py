"""``merge``, ``prune`` and ``fuse``: one driver for every command that rewrites a model.

Each command is a :class:`RewriteCommand`: its own options, how they become a request, and
how to describe the result. The driver does the rest the same way for all: load a saved
plan or compute one, apply it, write the model (atomically, with its manifest and tokenizer),
the plan and any figures, and print what changed.
"""

from __future__ import annotations

__all__ = ["COMMANDS", "register"]

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerfuse.cli.common import add_data_options, console, data_settings, output_path
from layerfuse.errors import LayerfuseError
from layerfuse.passes.plan import Plan, apply_plan
from layerfuse.progress import ConsoleReporter, Reporter


@dataclass(frozen=True)
class RewriteCommand:
    name: str
    help: str
    plan_class: Callable[[], type[Plan]]
    add_options: Callable[[argparse.ArgumentParser], None]
    make_plan: Callable[[argparse.Namespace, Reporter], Plan]
    describe: Callable[[Plan], str]
    calib_tokens: int
    valid_tokens: int
    figures: Callable[[Plan, Path], list[Path]] | None = None


def _write_variant(source: str, output: Path, model, plan: Plan, plan_path: Path) -> str:
    """Save a rewritten model with its manifest and plan; describe the size change."""
    from layerfuse.model.io import file_bytes, save_model
    from layerfuse.model.manifest import carry_manifest
    from layerfuse.reports.tables import human_bytes

    save_model(model, output)
    carry_manifest(source, output)
    plan.save(plan_path)
    before, after = file_bytes(source), file_bytes(output)
    return f"files {human_bytes(before)} -> {human_bytes(after)}; wrote {output} and {plan_path}"


def _run(spec: RewriteCommand, args: argparse.Namespace) -> int:
    output = output_path(args.output)
    plan_path = Path(args.plan_out) if args.plan_out else output.with_suffix(".plan.json")
    if args.plan:
        plan = spec.plan_class().load(args.plan)
    else:
        plan = spec.make_plan(args, ConsoleReporter())
    summary = _write_variant(args.model, output, apply_plan(args.model, plan), plan, plan_path)
    figures = spec.figures(plan, output.with_suffix("")) if spec.figures else []
    written = f"\nwrote {', '.join(str(p) for p in figures)}" if figures else ""
    console().print(f"{spec.describe(plan)}\n{summary}{written}")
    return 0


def register(commands) -> None:
    for spec in COMMANDS:
        parser = commands.add_parser(spec.name, help=spec.help, description=spec.help)
        parser.add_argument("model", help="the .onnx model to rewrite (layerfuse.json beside it)")
        parser.add_argument("-o", "--output", required=True, help="the rewritten model (.onnx)")
        parser.add_argument("--plan", help="apply this saved plan instead of computing one")
        parser.add_argument("--plan-out", help="where to write the plan (default OUTPUT.plan.json)")
        add_data_options(parser, calib_tokens=spec.calib_tokens, valid_tokens=spec.valid_tokens)
        spec.add_options(parser)
        parser.set_defaults(handler=lambda args, spec=spec: _run(spec, args))


# merge ------------------------------------------------------------------------------------


def _merge_options(parser: argparse.ArgumentParser) -> None:
    from layerfuse.passes.merge.plan import ANCHORS, FEATURES, METHODS

    parser.add_argument(
        "--ratio", default="1/3", help="share of FF sublayers removed: 1/3, 0.5, all-but-one"
    )
    parser.add_argument("--windows", type=int, default=1, help="split the ratio over N windows")
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


def _merge_plan(args: argparse.Namespace, reporter: Reporter) -> Plan:
    from layerfuse.passes.blocks import parse_ranges
    from layerfuse.passes.merge import MergeRequest, plan_merge

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
    )
    return plan_merge(args.model, request, reporter)


def _merge_summary(plan) -> str:
    from layerfuse.reports.tables import human_bytes, human_count

    windows = ", ".join(f"{w.blocks[0]}-{w.blocks[-1]} (anchor {w.anchor})" for w in plan.windows)
    return (
        f"tied {plan.merged_blocks + len(plan.windows)} FF sublayers in windows {windows} "
        f"with the {plan.method} method; removed {human_count(plan.parameters_removed)} "
        f"parameters ({human_bytes(plan.bytes_removed)})"
    )


def _merge_plan_class():
    from layerfuse.passes.merge import MergePlan

    return MergePlan


# prune ------------------------------------------------------------------------------------


def _prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default="block",
        choices=["block", "ff", "attention"],
        help="what to drop: whole blocks, FF sublayers or attention sublayers",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--count", type=int, help="how many blocks or sublayers to drop")
    budget.add_argument("--params", type=int, help="parameters to remove (rounded to units)")
    budget.add_argument("--match-plan", help="remove as many parameters as this merge plan removes")
    budget.add_argument("--blocks", help="explicit blocks, e.g. 3,5-7")
    parser.add_argument(
        "--select",
        default="influence",
        choices=["influence", "sliding"],
        help="influence: least ShortGPT block influence; sliding: best contiguous run on "
        "validation",
    )


def _prune_plan(args: argparse.Namespace, reporter: Reporter) -> Plan:
    from layerfuse.passes.blocks import parse_blocks
    from layerfuse.passes.merge import MergePlan
    from layerfuse.passes.prune import PruneRequest, plan_prune

    budget = MergePlan.load(args.match_plan).parameters_removed if args.match_plan else args.params
    request = PruneRequest(
        target=args.target,
        count=args.count,
        parameters=budget,
        blocks=parse_blocks(args.blocks) if args.blocks else None,
        select=args.select,
        data=data_settings(args),
    )
    return plan_prune(args.model, request, reporter)


def _prune_summary(plan) -> str:
    from layerfuse.reports.tables import human_count

    return (
        f"pruned {plan.target} {', '.join(map(str, plan.blocks))}: removed "
        f"{human_count(plan.parameters_removed)} parameters"
    )


def _prune_plan_class():
    from layerfuse.passes.prune import PrunePlan

    return PrunePlan


# fuse -------------------------------------------------------------------------------------


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


def _fuse_plan(args: argparse.Namespace, reporter: Reporter) -> Plan:
    from layerfuse.passes.blocks import parse_ranges
    from layerfuse.passes.fuse import FuseRequest, plan_fuse

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
    return plan_fuse(args.model, request, reporter)


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


COMMANDS = (
    RewriteCommand(
        "merge",
        "align, average and tie consecutive FF sublayers (shared initializers)",
        _merge_plan_class,
        _merge_options,
        _merge_plan,
        _merge_summary,
        calib_tokens=10240,
        valid_tokens=4096,
    ),
    RewriteCommand(
        "prune",
        "drop blocks or sublayers (the baseline merging is judged against)",
        _prune_plan_class,
        _prune_options,
        _prune_plan,
        _prune_summary,
        calib_tokens=4096,
        valid_tokens=4096,
    ),
    RewriteCommand(
        "fuse",
        "remove attention and fuse runs of FFN-only blocks into one wide FFN",
        _fuse_plan_class,
        _fuse_options,
        _fuse_plan,
        _fuse_summary,
        calib_tokens=2048,
        valid_tokens=2048,
        figures=_fuse_figures,
    ),
)
