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

from layerfuse.cli.common import add_data_options, console, output_path
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
    from layerfuse.passes.quantized import refuse_quantized_linears

    refuse_quantized_linears(args.model)
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


def register_rewrite(commands, spec: RewriteCommand) -> None:
    """Add the ``spec`` command with the options every rewriting command shares."""
    parser = commands.add_parser(spec.name, help=spec.help, description=spec.help)
    parser.add_argument("model", help="the .onnx model to rewrite (layerfuse.json beside it)")
    parser.add_argument("-o", "--output", required=True, help="the rewritten model (.onnx)")
    parser.add_argument("--plan", help="apply this saved plan instead of computing one")
    parser.add_argument("--plan-out", help="where to write the plan (default OUTPUT.plan.json)")
    add_data_options(parser, calib_tokens=spec.calib_tokens, valid_tokens=spec.valid_tokens)
    spec.add_options(parser)
    parser.set_defaults(handler=lambda args, spec=spec: _run(spec, args))
