"""Progress reporting that library code can call without knowing who is listening.

Long steps (export, calibration, window search) report through a :class:`Reporter`. The CLI
passes one that draws rich progress bars on stderr; library callers and tests get the silent
default, so nothing prints unless asked to.
"""

from __future__ import annotations

__all__ = ["SILENT", "ConsoleReporter", "Reporter"]

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Reporter:
    """Silent reporter; subclasses show progress."""

    def step(self, message: str) -> None:
        """A one-line note that a stage started or finished."""

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        """Yield ``items`` while showing how many of ``total`` are done."""
        yield from items


SILENT = Reporter()


class ConsoleReporter(Reporter):
    """Rich progress bars and status lines on stderr (stdout stays clean for ``--json``)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)

    def step(self, message: str) -> None:
        self.console.print(f"[dim]·[/dim] {message}")

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        if not self.console.is_terminal:
            # Logs (CI, files) get one line per step instead of redrawn bars.
            started, count = time.perf_counter(), 0
            for item in items:
                yield item
                count += 1
            self.step(f"{description}: {count} done in {time.perf_counter() - started:.1f} s")
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
