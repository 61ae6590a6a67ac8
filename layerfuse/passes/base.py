"""The base of every rewriting pass: a plan in, its preconditions and postconditions checked.

Like onnx_ir's own passes, a :class:`PlanPass` is an ``InPlacePass`` whose options (here: one
plan) are given to ``__init__``. ``requires`` checks that the plan was made for this model
(fingerprint, block count) and then the pass's own preconditions (:meth:`check`); ``ensures``
states what must be true afterwards. A :class:`~layerfuse.errors.LayerfuseError` raised in
either is the user's to fix, so it leaves the pass as itself, not wrapped in onnx_ir's
Pre/PostconditionError, and the CLI prints it as one line.

Every rewritten model records where it came from in its metadata: the fingerprint of the
model the first plan was applied to (the original a recovery run distils from) and the
schemas of the plans applied since.
"""

from __future__ import annotations

__all__ = ["PROVENANCE_PLANS", "PROVENANCE_SOURCE", "PlanPass", "source_fingerprint"]

from typing import TYPE_CHECKING

import onnx_ir as ir

from layerfuse.errors import LayerfuseError
from layerfuse.passes.detect import ModelStructure
from layerfuse.passes.quantized import refuse_quantized_linears

if TYPE_CHECKING:
    from layerfuse.passes.plan import Plan

PROVENANCE_SOURCE = "layerfuse.source_fingerprint"
PROVENANCE_PLANS = "layerfuse.plans"


def source_fingerprint(model: ir.Model) -> str | None:
    """The fingerprint of the original model this one was derived from, if layerfuse made it."""
    return model.metadata_props.get(PROVENANCE_SOURCE)


class PlanPass(ir.passes.InPlacePass):
    """An in-place rewrite that applies one plan."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan

    def check(self, structure: ModelStructure) -> None:
        """Preconditions beyond "this plan was made for this model" (override)."""

    def requires(self, model: ir.Model) -> None:
        refuse_quantized_linears(model)
        self.check(self.plan.check_fits(model))

    def rewrite(self, model: ir.Model) -> bool:
        """Apply the plan; return whether anything changed (override)."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = self.rewrite(model)
        if modified:
            props = model.metadata_props
            props.setdefault(PROVENANCE_SOURCE, self.plan.fingerprint)
            applied = [p for p in props.get(PROVENANCE_PLANS, "").split(",") if p]
            props[PROVENANCE_PLANS] = ",".join([*applied, self.plan.SCHEMA])
        return ir.passes.PassResult(model, modified=modified)

    def __call__(self, model: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        try:
            return super().__call__(model)
        except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
            if isinstance(exc.__cause__, LayerfuseError):
                raise exc.__cause__ from None
            raise
