"""The prune pass: drop the blocks or sublayers a prune plan names.

The surgery itself (:mod:`layerfuse.passes.sublayers`) is shared with FFN Fusion.
Post-condition: the model has exactly the plan's number of FF (``block``, ``ff``) or attention
(``attention``) sublayers fewer.
"""

from __future__ import annotations

__all__ = ["PruneSublayersPass"]

import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.passes.base import PlanPass
from layerfuse.passes.detect import ModelStructure, sublayer_counts
from layerfuse.passes.sublayers import check_removable, remove_sublayers


class PruneSublayersPass(PlanPass):
    """Remove the blocks, FF sublayers or attention sublayers a :class:`PrunePlan` names."""

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        self._before = sublayer_counts(model)

    def check(self, structure: ModelStructure) -> None:
        check_removable(structure, self.plan.target, self.plan.blocks)

    def rewrite(self, model: ir.Model) -> bool:
        remove_sublayers(model, self.plan.target, self.plan.blocks)
        return True

    def ensures(self, model: ir.Model) -> None:
        ffs, attentions = sublayer_counts(model)
        before_ffs, before_attentions = self._before
        removed = len(self.plan.blocks)
        expected = (
            (before_ffs, before_attentions - removed)
            if self.plan.target == "attention"
            else (before_ffs - removed, None)
        )
        if ffs != expected[0] or (expected[1] is not None and attentions != expected[1]):
            raise PlanError(
                f"pruning {self.plan.target} {self.plan.blocks} left {ffs} FF and {attentions} "
                f"attention sublayers; expected {expected[0]} FF"
                + ("" if expected[1] is None else f" and {expected[1]} attention")
            )
