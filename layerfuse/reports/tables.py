"""Terminal tables for the CLI (rich), kept apart from the logic that produces the numbers."""

from __future__ import annotations

__all__ = ["human_bytes", "human_count", "structure_table"]

from rich.table import Table

from layerfuse.passes.detect import ModelStructure


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
            kind = wiring.norm.kind if wiring.norm is not None else "layer"
            norm = f"{kind} ({wiring.norm_position})"
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
