"""``layerfuse inspect``: the blocks, FF sublayers, attention and norms layerfuse sees.

``--explain`` adds, per block, why each FF, norm, attention and residual Add was or was not
recognised, and why the other candidates were turned down; when no FF is found at all it
lists every rejected candidate before the one-line error.
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json

from layerfuse.cli.common import console


def _explain(structure, out) -> None:
    from layerfuse.passes.detect.explain import explain_blocks, explain_rejections
    from layerfuse.reports.tables import explanation_table

    rows = explain_blocks(structure.blocks) + explain_rejections(structure.rejected)
    out.print(explanation_table(rows, "why each part was (not) recognised"))


def _explained_json(structure) -> dict:
    from layerfuse.passes.detect.explain import explain_blocks, explain_rejections

    rows = explain_blocks(structure.blocks) + explain_rejections(structure.rejected, every=True)
    return {**structure.to_json(), "explain": [row.to_json() for row in rows]}


def _failure(error, args: argparse.Namespace) -> None:
    """With --explain, show every rejected candidate before the one-line error."""
    from layerfuse.passes.detect.explain import explain_rejections
    from layerfuse.reports.tables import explanation_table

    rows = explain_rejections(error.rejections, every=True)
    if args.json:
        print(json.dumps({"explain": [row.to_json() for row in rows]}, indent=2))
    else:
        console().print(explanation_table(rows, f"{args.model}: no FF sublayer recognised"))


def _run(args: argparse.Namespace) -> int:
    from layerfuse.errors import DetectionError
    from layerfuse.model.io import load_model
    from layerfuse.passes.detect import detect_structure
    from layerfuse.reports.tables import human_bytes, human_count, structure_table

    try:
        structure = detect_structure(load_model(args.model))
    except DetectionError as error:
        if args.explain:
            _failure(error, args)
        raise
    if args.json:
        data = _explained_json(structure) if args.explain else structure.to_json()
        print(json.dumps(data, indent=2))
        return 0
    out = console()
    out.print(structure_table(structure, f"{args.model}: {len(structure.blocks)} blocks"))
    share = structure.ff_parameter_count / max(structure.parameter_count, 1)
    out.print(
        f"parameters {human_count(structure.parameter_count)} "
        f"({human_bytes(structure.weight_bytes)}), FF sublayers "
        f"{human_count(structure.ff_parameter_count)} ({share:.0%}), attention "
        f"{human_count(structure.attention_parameter_count)}; fingerprint {structure.fingerprint}"
    )
    if args.explain:
        _explain(structure, out)
    return 0


def register(commands) -> None:
    parser = commands.add_parser("inspect", help="find blocks and FF sublayers in a graph")
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument(
        "--json", action="store_true", help="print the layerfuse.structure/2 JSON schema"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="say per block why each FF, norm, attention and residual Add was or was not "
        "recognised, and why other candidates were turned down (with --json: an 'explain' list)",
    )
    parser.set_defaults(handler=_run)
