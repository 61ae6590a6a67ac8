"""Command-line options generated from settings dataclasses (:mod:`layerfuse.options`).

The dataclass is the one place a setting is declared: its name, type, default, help and
rules. Here it becomes an argparse option with that default shown, and the parsed options
become the dataclass again, so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

__all__ = ["add_settings_options", "settings_from_args"]

import argparse
from dataclasses import Field
from typing import Any, TypeVar

from layerfuse.cli.common import positive_float, positive_int
from layerfuse.options import option_name, options_of

Settings = TypeVar("Settings")


def _dest(spec: Field) -> str:
    return option_name(spec).removeprefix("--").replace("-", "_")


def _type(spec: Field):
    default, positive = spec.default, spec.metadata["positive"]
    if default is None or isinstance(default, bool | str):
        return str
    if isinstance(default, int):
        return positive_int if positive else int
    return positive_float if positive else float


def add_settings_options(parser: argparse.ArgumentParser, settings: type) -> None:
    """One option per field of ``settings`` declared with :func:`layerfuse.options.option`."""
    for spec in options_of(settings):
        default = spec.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        suffix = "" if default is None else f" (default {shown})"
        parser.add_argument(
            option_name(spec),
            dest=_dest(spec),
            type=_type(spec),
            default=default,
            choices=spec.metadata["choices"],
            help=f"{spec.metadata['help']}{suffix}".replace("%", "%%"),
        )


def settings_from_args(
    settings: type[Settings], args: argparse.Namespace, **fixed: Any
) -> Settings:
    """``settings`` built from the parsed options, plus ``fixed`` fields set by the caller."""
    values = {spec.name: getattr(args, _dest(spec)) for spec in options_of(settings)}
    return settings(**values, **fixed)
