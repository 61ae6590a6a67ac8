"""The prune plan: which blocks or sublayers are dropped, and the scores that chose them."""

from __future__ import annotations

__all__ = ["TARGETS", "PrunePlan"]

import os
from dataclasses import dataclass
from pathlib import Path

from layerfuse.errors import PlanError
from layerfuse.passes.plan_io import read_plan_json, write_json_atomic

SCHEMA = "layerfuse.prune-plan/1"
# block: attention + FF of a block; ff / attention: that sublayer only.
TARGETS = ("block", "ff", "attention")


@dataclass
class PrunePlan:
    fingerprint: str
    num_blocks: int
    target: str
    blocks: list[int]
    selection: dict | None = None
    parameters_removed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise PlanError(f"unknown prune target '{self.target}' (choose {', '.join(TARGETS)})")
        if not self.blocks:
            raise PlanError("nothing to prune: the plan names no block")
        outside = [b for b in self.blocks if not 0 <= b < self.num_blocks]
        if outside:
            raise PlanError(
                f"block {outside[0]} is out of range for a model of {self.num_blocks} blocks "
                f"(0-{self.num_blocks - 1})"
            )
        if len(set(self.blocks)) != len(self.blocks):
            raise PlanError("the plan names a block twice")
        if self.target != "attention" and len(self.blocks) >= self.num_blocks:
            raise PlanError(
                f"pruning all {self.num_blocks} {'blocks' if self.target == 'block' else 'FFs'} "
                f"would leave no {'transformer block' if self.target == 'block' else 'FF'}"
            )
        self.blocks = sorted(self.blocks)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "fingerprint": self.fingerprint,
            "num_blocks": self.num_blocks,
            "target": self.target,
            "blocks": self.blocks,
            "parameters_removed": self.parameters_removed,
            "selection": self.selection,
        }

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunePlan:
        data = read_plan_json(path, SCHEMA)
        return cls(
            fingerprint=data["fingerprint"],
            num_blocks=int(data["num_blocks"]),
            target=data["target"],
            blocks=[int(b) for b in data["blocks"]],
            selection=data.get("selection"),
            parameters_removed=int(data.get("parameters_removed", 0)),
        )
