"""Settings fields that describe themselves, so the command line is generated, not re-typed.

A settings dataclass declares each field with :func:`option`: its default, the one-line help
the CLI shows, whether zero is meaningless (``positive``), its choices, and its option name
when that is not ``--field-name`` (``None``: not an option). The CLI builds its arguments
from these fields (:mod:`layerfuse.cli.settings`), so a new setting appears on the command
line, with its default in the help, by being added here once.
"""

from __future__ import annotations

__all__ = ["check_number", "check_options", "option", "option_name", "options_of"]

import math
from dataclasses import MISSING, Field, field, fields
from typing import Any

from layerfuse.errors import LayerfuseError

_DEFAULT_NAME: Any = MISSING


def option(
    default: Any,
    help: str,
    *,
    positive: bool = False,
    choices: tuple[str, ...] | None = None,
    name: str | None = _DEFAULT_NAME,
) -> Any:
    """A dataclass field with ``default`` and what the command line needs to offer it."""
    metadata = {"help": help, "positive": positive, "choices": choices}
    if name is not _DEFAULT_NAME:
        metadata["name"] = name
    return field(default=default, metadata=metadata)


def option_name(spec: Field) -> str | None:
    """The field's command-line name (``--batch-size``), or None if it is not an option."""
    return spec.metadata.get("name", "--" + spec.name.replace("_", "-"))


def options_of(settings: Any) -> list[Field]:
    """The fields of a settings dataclass (or class) that are options."""
    return [f for f in fields(settings) if "help" in f.metadata and option_name(f) is not None]


def check_options(settings: Any) -> None:
    """The rules the fields declare: numbers finite and >= 0, positive where zero means
    nothing, one of the choices; one line naming the option otherwise."""
    for spec in options_of(settings):
        value, name = getattr(settings, spec.name), option_name(spec)
        choices = spec.metadata["choices"]
        if choices is not None and value not in choices:
            raise LayerfuseError(f"unknown {name} '{value}' (choose {', '.join(choices)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        check_number(name, value)
        if spec.metadata["positive"] and value == 0:
            raise LayerfuseError(f"{name} must be positive")


def check_number(name: str, value: float) -> None:
    """The rule every numeric option obeys, on the command line and in settings alike:
    finite and not negative (``--threads -1``, ``--lr nan``)."""
    if not math.isfinite(value) or value < 0:
        raise LayerfuseError(f"{name} must be a finite number >= 0, not {value}")
