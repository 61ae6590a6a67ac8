"""``layerfuse optimize``: from a target, a quality limit and a budget to the best model.

Proposes merges, block pruning and attention removal sized to the target, screens them
without training, recovers the best within the budget, measures the finalists side by side
and writes OUTDIR/winner/, OUTDIR/finalists/NAME/plan.json and OUTDIR/report.json|md|png.
Running the same command again continues an interrupted search.
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json
from pathlib import Path

from layerfuse.cli.common import add_provider_option, console, model_file, positive_int
from layerfuse.errors import LayerfuseError
from layerfuse.progress import ConsoleReporter


def _request(args: argparse.Namespace):
    from layerfuse.optimize import (
        OptimizeRequest,
        load_space,
        parse_budget,
        parse_limit,
        parse_target,
    )
    from layerfuse.optimize.space import space_document

    missing = [o for o, v in (("MODEL", args.model), ("-o", args.output)) if v is None]
    missing += [o for o, v in (("--target", args.target), ("--max-quality-loss", args.limit))
                if v is None]  # fmt: skip
    if missing:
        raise LayerfuseError(f"optimize needs {', '.join(missing)}")
    space = load_space(args.space)
    if args.finalists is not None or args.shape is not None:
        document = space.to_json()
        if args.finalists is not None:
            document["finalists"] = args.finalists
        if args.shape is not None:
            document["measure"]["shape"] = args.shape
        space = space_document(document)
    return OptimizeRequest(
        model=Path(args.model),
        output=Path(args.output),
        target=parse_target(args.target),
        limit=parse_limit(args.limit),
        budget=parse_budget(args.recover_budget),
        space=space,
        data=args.data,
        provider=args.provider,
        seed=args.seed,
        device=args.device,
        stop_after=args.stop_after,
        quantize=args.quantize,
    )


def _run(args: argparse.Namespace) -> int:
    from layerfuse.optimize import optimize, write_default_space
    from layerfuse.runtime.inputs import parse_shapes

    if args.write_space:
        path = write_default_space(args.write_space)
        console().print(f"wrote the default search space to {path}")
        return 0
    if args.shape is not None:
        parse_shapes(args.shape)
    report = optimize(_request(args), ConsoleReporter())
    if report is None:
        return 0
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    out = console()
    out.print(report["why"])
    if report.get("winner_model"):
        out.print(f"wrote {report['winner_model']}")
    out.print(f"report: {Path(args.output) / 'report.md'} (and .json, .png)")
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "optimize",
        help="search for the best compressed model meeting a target within a quality limit",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add = parser.add_argument
    add("model", nargs="?", type=model_file, help="the .onnx model (layerfuse.json beside it)")
    add("-o", "--output", help="output folder (state, finalists, winner, report)")
    add("--target", help="params=0.8 (fraction of parameters kept), latency=1.2x, memory=300MB")
    add(
        "--max-quality-loss",
        dest="limit",
        help="10%% (test perplexity at most 1.1x the original's) or 1pt (topic accuracy of a "
        "text encoder at most 1 point lower)",
    )
    add(
        "--recover-budget",
        default="30m",
        help="30m / 90s / 1h of CPU time for recovery, split over the finalists, or "
        "100k-tokens of distillation; 0 skips recovery (default 30m)",
    )
    add("--space", help="search space JSON (see --write-space and docs/optimize.md)")
    add("--write-space", metavar="FILE", help="write the default search space to FILE and stop")
    add("--finalists", type=positive_int, help="how many candidates to recover (space: 3)")
    add("--shape", help="BATCHxSEQUENCE latency is measured at (space: 1x128)")
    add("--data", default="fortunes", help="text for calibration, screening, training, test")
    add("--seed", type=int, default=0, help="seed of calibration order and training (default 0)")
    add(
        "--stop-after",
        choices=["screen", "recover", "measure"],
        help="stop after this stage, as an interrupted run would (run again to continue)",
    )
    add(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="torch device of recovery (with cuda, a token budget says more than CPU time)",
    )
    add(
        "--quantize",
        metavar="int4|int8",
        help="also measure every recovered finalist quantized (MatMulNBits int4 or dynamic "
        "int8) as a finalist of its own; a memory target can then be met by quantizing",
    )
    add("--json", action="store_true", help="print the report as JSON")
    add_provider_option(parser)
    parser.set_defaults(handler=_run)
