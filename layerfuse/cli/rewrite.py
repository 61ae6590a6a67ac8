"""One driver for every command that rewrites a model (``merge``, ``prune``, ``fuse``).

Each command is a :class:`RewriteCommand`: its own options, how they become a request, and
how to describe the result. The driver does the rest the same way for all: load a saved
plan or compute one, apply it, write the model (atomically, with its manifest and tokenizer),
the plan and any figures, and print what changed.
"""

from __future__ import annotations

__all__ = ["RewriteCommand", "register_rewrite"]

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from layerfuse.cli.common import add_data_options, console, model_file, output_path
from layerfuse.errors import LayerfuseError, PlanError
from layerfuse.files import check_writable, refuse_overwriting_inputs
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


# Options that mean the same with a saved plan as without one.
_PLAN_INDEPENDENT = frozenset(
    {"command", "debug", "handler", "model", "output", "plan", "plan_out"}
)


def _refuse_options_the_plan_decides(parser: argparse.ArgumentParser, args) -> None:
    """With ``--plan``, planning options would be silently ignored: say so instead."""
    ignored = [
        "--" + dest.replace("_", "-")
        for dest, value in vars(args).items()
        if dest not in _PLAN_INDEPENDENT and value != parser.get_default(dest)
    ]
    if ignored:
        raise LayerfuseError(
            f"{', '.join(ignored)} cannot apply with --plan: the saved plan already fixes what "
            f"they choose; drop them, or plan again without --plan"
        )


def _measured_change(source: Path, output: Path) -> str:
    """Parameters and file bytes before and after, read from the files as written."""
    from layerfuse.model.io import file_bytes, load_model, parameter_count
    from layerfuse.reports.tables import human_bytes, human_count

    # Rewrites refuse quantized graphs, so stored elements are the parameters here.
    before, after = (parameter_count(load_model(path)) for path in (source, output))
    return (
        f"parameters {human_count(before)} -> {human_count(after)} "
        f"({(after - before) / before:+.1%}); files {human_bytes(file_bytes(source))} -> "
        f"{human_bytes(file_bytes(output))}"
    )


def _write_variant(source: Path, output: Path, model, plan: Plan, plan_path: Path) -> str:
    """Save a rewritten model with its manifest and plan; the change as measured on disk."""
    from layerfuse.model.io import save_model
    from layerfuse.model.manifest import carry_manifest

    save_model(model, output)
    carry_manifest(source, output)
    plan.save(plan_path)
    return f"{_measured_change(source, output)}; wrote {output} and {plan_path}"


def _refuse_unchanged(source: Path, model, plan_source: str) -> None:
    from layerfuse.model.io import load_model

    original = load_model(source)
    same_nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)) == sum(
        1 for _ in ir.traversal.RecursiveGraphIterator(original.graph)
    )
    if same_nodes and len(model.graph.initializers) == len(original.graph.initializers):
        raise PlanError(f"{plan_source} changes nothing in {source}; nothing was written")


def _run(spec: RewriteCommand, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from layerfuse.model.publish import model_files

    output = check_writable(output_path(args.output))
    plan_path = Path(args.plan_out) if args.plan_out else output.with_suffix(".plan.json")
    inputs = model_files(args.model) + ([Path(args.plan)] if args.plan else [])
    refuse_overwriting_inputs(inputs, [output, plan_path])
    if args.plan:
        _refuse_options_the_plan_decides(parser, args)
        plan = spec.plan_class().load(args.plan)
    else:
        plan = spec.make_plan(args, ConsoleReporter())
    model = apply_plan(args.model, plan)
    _refuse_unchanged(args.model, model, args.plan or "the plan")
    summary = _write_variant(args.model, output, model, plan, plan_path)
    figures = spec.figures(plan, output.with_suffix("")) if spec.figures else []
    written = f"\nwrote {', '.join(str(p) for p in figures)}" if figures else ""
    console().print(f"{spec.describe(plan)}\n{summary}{written}")
    return 0


def register_rewrite(commands, spec: RewriteCommand) -> None:
    """Add the ``spec`` command with the options every rewriting command shares."""
    parser = commands.add_parser(spec.name, help=spec.help, description=spec.help)
    parser.add_argument(
        "model", type=model_file, help="the .onnx model to rewrite (layerfuse.json beside it)"
    )
    parser.add_argument("-o", "--output", required=True, help="the rewritten model (.onnx)")
    parser.add_argument("--plan", help="apply this saved plan instead of computing one")
    parser.add_argument("--plan-out", help="where to write the plan (default OUTPUT.plan.json)")
    add_data_options(parser, calib_tokens=spec.calib_tokens, valid_tokens=spec.valid_tokens)
    spec.add_options(parser)
    parser.set_defaults(handler=lambda args, spec=spec, parser=parser: _run(spec, parser, args))
