"""The teacher: the ORIGINAL graph in onnxruntime, as deployed, never a torch re-creation.

Distilling from the graph the user exported means the student learns to match the numbers
the original model really produces. Block outputs for ``kd+hidden`` are read with an
:class:`~layerfuse.runtime.calibration.ActivationTap` (extra graph outputs; weights stay in
the original's external data, nothing is copied).
"""

from __future__ import annotations

__all__ = ["Teacher"]

import os
from collections.abc import Sequence

import numpy as np

from layerfuse.runtime.calibration import ActivationTap, adapt_feeds


class Teacher:
    """Runs the original graph; returns its first output and the tapped tensors."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        taps: Sequence[str] = (),
        *,
        provider: str = "cpu",
        threads: int | None = None,
    ) -> None:
        self.tap = ActivationTap(
            model_path, list(taps), provider=provider, threads=threads, lean=None
        )

    def feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` completed with the inputs the graph also takes (token types, positions):
        the student, a rewrite of the same graph, takes the very same ones."""
        return adapt_feeds(self.tap.session, feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outputs, tapped = self.tap.run(feeds)
        return outputs[0], tapped
