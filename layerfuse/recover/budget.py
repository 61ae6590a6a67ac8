"""The CPU-time budget of a recovery run, and where its CPU time went.

CPU time is the process's user+system time (``os.times()``: every thread, onnxruntime's
included), so a budget means the same compute when other jobs share the cores, unlike wall
time. A run is charged its setup (reading the models and data, building the student and
the teacher), the local stage and the distillation steps (checkpoint writes included);
validation is not charged (it measures the run, it does not train it), nor is a resumed
run's reloading (an uninterrupted run would not pay it). The charges live in the
:class:`~layerfuse.recover.trainer.TrainResult`, so they survive a checkpoint and a resume
continues the count; ``cpu_minutes`` is always their sum.
"""

from __future__ import annotations

__all__ = ["CpuClock", "cpu_seconds"]

import os


def cpu_seconds() -> float:
    """This process's user+system CPU seconds so far."""
    times = os.times()
    return times.user + times.system


class CpuClock:
    """Charges the CPU time since its last mark to a result's distillation minutes."""

    def __init__(self, result) -> None:
        self.result = result
        self.mark = cpu_seconds()

    @staticmethod
    def start(result, setup_seconds: float, local_seconds: float) -> None:
        """A fresh run's charges before its first distillation step."""
        result.setup_cpu_minutes = setup_seconds / 60
        result.local_cpu_minutes = local_seconds / 60
        result.kd_cpu_minutes = 0.0
        CpuClock.total(result)

    @staticmethod
    def total(result) -> None:
        result.cpu_minutes = (
            result.setup_cpu_minutes + result.local_cpu_minutes + result.kd_cpu_minutes
        )

    def charge(self) -> None:
        """Charge the time since the last mark to distillation."""
        now = cpu_seconds()
        self.result.kd_cpu_minutes += (now - self.mark) / 60
        self.total(self.result)
        self.mark = now

    def skip(self) -> None:
        """Leave the time since the last mark uncharged (validation)."""
        self.mark = cpu_seconds()

    def spent(self, budget_minutes: float) -> bool:
        """True when a budget is set and the run's charged CPU time has reached it."""
        return budget_minutes > 0 and self.result.cpu_minutes >= budget_minutes
