"""Terminal tables for the CLI (rich), kept apart from the logic that produces the numbers."""

from __future__ import annotations

__all__ = ["explanation_table", "human_bytes", "human_count", "structure_table"]

from rich.table import Table

from layerfuse.passes.detect import ModelStructure
from layerfuse.passes.detect.explain import Explanation


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def human_count(count: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(int(count))


def structure_table(structure: ModelStructure, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in (
        "block",
        "module",
        "FF kind",
        "d -> F",
        "FF params",
        "pre-activation",
        "norm",
        "attention",
        "attn params",
    ):
        table.add_column(column, overflow="fold")
    for block in structure.blocks:
        ff = block.ff
        wiring = block.ff_wiring
        norm = "-"
        if wiring.norm_position is not None:
            found = wiring.norm or wiring.output_norm or wiring.post_norm
            norm = f"{found.kind if found else 'no'} ({wiring.norm_position})"
        if wiring.parallel:
            norm += ", parallel"
        attention = block.attention
        table.add_row(
            str(block.index),
            block.module or "-",
            ff.kind,
            f"{ff.model_dim} -> {ff.width}",
            human_count(ff.parameter_count),
            ff.pre_activation.name,
            norm,
            "-" if attention is None else f"{attention.kind} ({len(attention.projections)} proj)",
            "-" if attention is None else human_count(attention.parameter_count),
        )
    return table


def explanation_table(rows: list[Explanation], title: str) -> Table:
    """``inspect --explain``: what was recognised where, and why (or why not)."""
    table = Table(title=title, title_justify="left", show_lines=False)
    for column in ("block", "part", "found", "why"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            "-" if row.block is None else str(row.block),
            row.part,
            "yes" if row.found else "no",
            row.why,
        )
    return table
