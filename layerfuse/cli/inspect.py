"""``layerfuse inspect``: the blocks, FF sublayers, attention and norms layerfuse sees."""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json

from layerfuse.cli.common import console


def _run(args: argparse.Namespace) -> int:
    from layerfuse.model.io import load_model
    from layerfuse.passes.detect import detect_structure
    from layerfuse.reports.tables import human_bytes, human_count, structure_table

    structure = detect_structure(load_model(args.model))
    if args.json:
        print(json.dumps(structure.to_json(), indent=2))
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
    return 0


def register(commands) -> None:
    parser = commands.add_parser("inspect", help="find blocks and FF sublayers in a graph")
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument(
        "--json", action="store_true", help="print the layerfuse.structure/1 JSON schema"
    )
    parser.set_defaults(handler=_run)
