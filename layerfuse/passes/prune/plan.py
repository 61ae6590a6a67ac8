"""The prune plan: which blocks or sublayers are dropped, and the scores that chose them."""

from __future__ import annotations

__all__ = ["TARGETS", "PrunePlan"]

from dataclasses import dataclass

from layerfuse.errors import PlanError
from layerfuse.passes.blocks import check_blocks
from layerfuse.passes.plan import Plan

# block: attention + FF of a block; ff / attention: that sublayer only.
TARGETS = ("block", "ff", "attention")


@dataclass
class PrunePlan(Plan):
    SCHEMA = "layerfuse.prune-plan/1"

    target: str
    blocks: list[int]
    selection: dict | None = None
    parameters_removed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise PlanError(f"unknown prune target '{self.target}' (choose {', '.join(TARGETS)})")
        if not self.blocks:
            raise PlanError("nothing to prune: the plan names no block")
        self.blocks = check_blocks(self.blocks, self.num_blocks)
        if self.target != "attention" and len(self.blocks) >= self.num_blocks:
            raise PlanError(
                f"pruning all {self.num_blocks} {'blocks' if self.target == 'block' else 'FFs'} "
                f"would leave no {'transformer block' if self.target == 'block' else 'FF'}"
            )

    def rewrite_pass(self):
        from layerfuse.passes.prune.rewrite import PruneSublayersPass

        return PruneSublayersPass(self)

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "num_blocks": self.num_blocks,
            "target": self.target,
            "blocks": self.blocks,
            "parameters_removed": self.parameters_removed,
            "selection": self.selection,
        }

    @classmethod
    def from_json(cls, data: dict) -> PrunePlan:
        return cls(
            fingerprint=data["fingerprint"],
            num_blocks=int(data["num_blocks"]),
            target=data["target"],
            blocks=[int(b) for b in data["blocks"]],
            selection=data.get("selection"),
            parameters_removed=int(data.get("parameters_removed", 0)),
        )
