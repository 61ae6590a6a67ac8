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
from layerfuse.passes.plan import Plan
from layerfuse.progress import ConsoleReporter


@dataclass(frozen=True)
class RewriteCommand:
    name: str
    help: str
    plan_class: Callable[[], type[Plan]]
    add_options: Callable[[argparse.ArgumentParser], None]
    make_request: Callable[[argparse.Namespace], object]
    describe: Callable[[Plan], str]
    calib_tokens: int
    valid_tokens: int
    figures: Callable[[Plan, Path], list[Path]] | None = None
    # The layerfuse.api planner that turns the request into a plan.
    planner: str = ""


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


def _graph_size(model: ir.Model) -> tuple[int, int]:
    nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    return nodes, len(model.graph.initializers)


def _run(spec: RewriteCommand, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import layerfuse.api as api
    from layerfuse.model.publish import model_files

    output = check_writable(output_path(args.output))
    plan_path = Path(args.plan_out) if args.plan_out else output.with_suffix(".plan.json")
    inputs = model_files(args.model) + ([Path(args.plan)] if args.plan else [])
    refuse_overwriting_inputs(inputs, [output, plan_path])
    model = api.load(args.model)
    if args.plan:
        _refuse_options_the_plan_decides(parser, args)
        plan = spec.plan_class().load(args.plan)
    else:
        planner = getattr(api, spec.planner)
        plan = planner(model, spec.make_request(args), reporter=ConsoleReporter())
    before = _graph_size(model.ir)
    plan.apply(model)
    if _graph_size(model.ir) == before:
        raise PlanError(
            f"{args.plan or 'the plan'} changes nothing in {args.model}; nothing was written"
        )
    model.save(output)
    plan.save(plan_path)
    summary = f"{_measured_change(args.model, output)}; wrote {output} and {plan_path}"
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
