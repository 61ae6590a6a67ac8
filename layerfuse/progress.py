"""Progress reporting that library code can call without knowing who is listening.

Long steps (export, calibration, window search) report through a :class:`Reporter`. The CLI
passes one that draws rich progress bars on stderr; library callers and tests get the silent
default, so nothing prints unless asked to.
"""

from __future__ import annotations

__all__ = ["LOG_EVERY_S", "SILENT", "ConsoleReporter", "Reporter"]

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
# Seconds between progress lines when stderr is not a terminal.
LOG_EVERY_S = 20.0


class ConsoleReporter(Reporter):
    """Rich progress bars and status lines on stderr (stdout stays clean for ``--json``)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)

    def step(self, message: str) -> None:
        self.console.print(f"[dim]·[/dim] {message}")

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        if not self.console.is_terminal:
            yield from self._logged(items, total, description)
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

    def _logged(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        """Logs (CI, files, ``nohup``) get lines instead of redrawn bars: when a stage
        starts, every ``LOG_EVERY_S`` seconds while it runs, and when it ends, so a long
        stage is never silent."""
        started = last = time.perf_counter()
        self.step(f"{description}: started" + (f" ({total} to do)" if total else ""))
        count = 0
        for item in items:
            yield item
            count += 1
            now = time.perf_counter()
            if now - last >= LOG_EVERY_S:
                last = now
                done = f"{count}/{total}" if total else str(count)
                eta = (now - started) / count * (total - count) if total else None
                remaining = f", about {eta:.0f} s left" if eta is not None else ""
                self.step(f"{description}: {done} after {now - started:.0f} s{remaining}")
        self.step(f"{description}: {count} done in {time.perf_counter() - started:.1f} s")
