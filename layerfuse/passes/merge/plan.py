"""The merge plan: which FFs are tied together, how their neurons are permuted, and why.

A plan is the reviewable output of analysis (:mod:`layerfuse.passes.merge.planner`) and the
only input of rewriting (:class:`layerfuse.passes.merge.tie.TieFeedForwardsPass`). Saved as
JSON it can be applied again to the same model without recomputing anything; refitted output
weights, too large for JSON, go to an ``.npz`` file beside it whose hash the JSON records.
"""

from __future__ import annotations

__all__ = [
    "FEATURES",
    "RELAX_INITS",
    "MergePlan",
    "MergeWindow",
    "anchor_of",
    "parse_ratio",
    "window_sizes",
]

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from layerfuse.errors import PlanError
from layerfuse.passes.blocks import check_ranges
from layerfuse.passes.merge.window import MergeWindow
from layerfuse.passes.plan import Plan, read_sidecar, write_sidecar

METHODS = ("permute", "vanilla")
ANCHORS = ("first", "middle", "last")
# The FF tensor neurons are aligned on: before the nonlinearity (the gate's output in gated
# FFs), the up-projection's output (what the paper's code uses for SwiGLU), or what the
# down-projection reads.
FEATURES = ("pre_activation", "up", "hidden")
# How a relaxed tie's per-layer deltas start (:mod:`layerfuse.passes.merge.relax`).
RELAX_INITS = ("svd", "zero")


@dataclass
class MergePlan(Plan):
    SCHEMA = "layerfuse.merge-plan/1"

    method: str
    anchor: str
    windows: list[MergeWindow]
    features: str = "pre_activation"
    calibration: dict = field(default_factory=dict)
    selection: dict | None = None
    parameters_removed: int = 0
    bytes_removed: int = 0
    refit: dict | None = None
    # Validation score of the original and of the merged model, when planning scored any.
    validation: dict | None = None
    # Refitted output-side weights per window index: {"down": [width, d], "down_bias": [d]}.
    refit_weights: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    # Rank of each tied layer's own low-rank delta per projection; 0 is a plain tie.
    relax_rank: int = 0
    relax_init: str = "svd"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("method", self.method, METHODS),
            ("anchor", self.anchor, ANCHORS),
            ("features", self.features, FEATURES),
            ("relax init", self.relax_init, RELAX_INITS),
        ):
            if value not in allowed:
                raise PlanError(f"unknown merge {name} '{value}' (choose {', '.join(allowed)})")
        if not isinstance(self.relax_rank, int) or self.relax_rank < 0:
            raise PlanError(f"relax rank {self.relax_rank!r} is not a whole number >= 0")
        if not self.windows:
            raise PlanError("the merge plan has no windows: it would tie nothing")
        ranges = [(w.blocks[0], w.blocks[-1]) for w in self.windows if w.blocks]
        check_ranges(ranges, self.num_blocks, min_length=2, what="window")
        for window in self.windows:
            blocks = window.blocks
            if len(blocks) < 2 or blocks != list(range(blocks[0], blocks[0] + len(blocks))):
                raise PlanError(f"window {blocks} is not a run of 2 or more consecutive blocks")
            if window.anchor not in blocks:
                raise PlanError(f"anchor {window.anchor} is not in window {blocks}")

    @property
    def merged_blocks(self) -> int:
        return sum(len(w.blocks) - 1 for w in self.windows)

    def rewrite_pass(self):
        from layerfuse.passes.merge.tie import TieFeedForwardsPass

        return TieFeedForwardsPass(self)

    def to_json(self) -> dict:
        # A plain tie's JSON stays what it was before relaxed ties existed.
        relax = {"relax": {"rank": self.relax_rank, "init": self.relax_init}}
        return {
            "fingerprint": self.fingerprint,
            "num_blocks": self.num_blocks,
            "method": self.method,
            "anchor": self.anchor,
            "features": self.features,
            "parameters_removed": self.parameters_removed,
            "bytes_removed": self.bytes_removed,
            "calibration": self.calibration,
            "selection": self.selection,
            "refit": self.refit,
            "validation": self.validation,
            "windows": [w.to_json() for w in self.windows],
            **(relax if self.relax_rank else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> MergePlan:
        return cls(
            fingerprint=data["fingerprint"],
            num_blocks=int(data["num_blocks"]),
            method=data["method"],
            anchor=data["anchor"],
            windows=[MergeWindow.from_json(w) for w in data["windows"]],
            features=data.get("features", "pre_activation"),
            calibration=data.get("calibration", {}),
            selection=data.get("selection"),
            parameters_removed=int(data.get("parameters_removed", 0)),
            bytes_removed=int(data.get("bytes_removed", 0)),
            refit=data.get("refit"),
            validation=data.get("validation"),
            relax_rank=int(data.get("relax", {}).get("rank", 0)),
            relax_init=data.get("relax", {}).get("init", "svd"),
        )

    def save_sidecars(self, path: Path, data: dict) -> None:
        if not self.refit_weights:
            return
        arrays = {
            f"{index}/{name}": array
            for index, weights in self.refit_weights.items()
            for name, array in weights.items()
        }
        data["refit"] = {**(self.refit or {}), **write_sidecar(path, arrays)}

    def load_sidecars(self, path: Path, data: dict) -> None:
        refit = data.get("refit")
        if not refit or not refit.get("file"):
            return
        for key, array in read_sidecar(path, refit, "refit weights").items():
            index, name = key.split("/", 1)
            self.refit_weights.setdefault(int(index), {})[name] = array


def parse_ratio(text: str, num_blocks: int) -> int:
    """How many FF sublayers' parameters a ratio removes: ``1/3``, ``0.5``, ``all-but-one``."""
    if text in ("all-but-one", "all"):
        return num_blocks - 1
    try:
        ratio = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise PlanError(f"merge ratio '{text}' is not a fraction like 1/3 or 0.5") from None
    if not 0 < ratio < 1:
        raise PlanError(f"merge ratio {text} must be between 0 and 1 (exclusive)")
    removed = round(ratio * num_blocks)
    if removed < 1:
        raise PlanError(
            f"merge ratio {text} of {num_blocks} FF sublayers removes none; use a larger ratio"
        )
    return min(removed, num_blocks - 1)


def window_sizes(removed: int, windows: int, num_blocks: int) -> list[int]:
    """Sizes of ``windows`` windows that together remove ``removed`` FFs (k-1 per window)."""
    if windows < 1:
        raise PlanError("at least one window is needed")
    if removed < windows:
        raise PlanError(f"{windows} windows cannot remove only {removed} FF sublayers")
    base, extra = divmod(removed, windows)
    sizes = [base + 1 + (1 if i < extra else 0) for i in range(windows)]
    if sum(sizes) > num_blocks:
        raise PlanError(
            f"{windows} windows removing {removed} FFs need {sum(sizes)} blocks; "
            f"the model has {num_blocks}"
        )
    return sizes


def anchor_of(blocks: list[int], anchor: str) -> int:
    return {"first": blocks[0], "middle": blocks[len(blocks) // 2], "last": blocks[-1]}[anchor]
