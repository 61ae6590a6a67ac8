"""Refuse to distil a graph from a teacher it was not made from, or with a plan for neither.

Every model a layerfuse pass writes records the fingerprint of the model the first plan was
applied to (:data:`layerfuse.passes.base.PROVENANCE_SOURCE`) and the schemas of the plans
applied since. Recovery checks that record against ORIGINAL's fingerprint before any work:
training a student against the wrong teacher would run for an hour and produce garbage.
An OPTIMIZED graph with no record is accepted only when it is structurally ORIGINAL itself
(plain self-distillation).
"""

from __future__ import annotations

__all__ = ["check_derived", "load_any_plan"]

import os
from pathlib import Path

import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.model.fingerprint import fingerprint
from layerfuse.passes.base import PROVENANCE_PLANS, source_fingerprint
from layerfuse.passes.plan import Plan
from layerfuse.passes.registry import load_plan


def check_derived(original: ir.Model, optimized: ir.Model) -> str:
    """ORIGINAL's fingerprint, after checking OPTIMIZED was derived from it."""
    expected = fingerprint(original)
    recorded = source_fingerprint(optimized)
    if recorded is None:
        if fingerprint(optimized) == expected:
            return expected
        raise PlanError(
            "OPTIMIZED records no source model (metadata 'layerfuse.source_fingerprint'): "
            "recover distils graphs that layerfuse merge/prune/fuse derived from ORIGINAL"
        )
    if recorded != expected:
        raise PlanError(
            f"OPTIMIZED was derived from a model with fingerprint {recorded}, but ORIGINAL "
            f"has {expected}: pass the model the optimized one was made from"
        )
    return expected


def load_any_plan(path: str | os.PathLike, original: ir.Model, optimized: ir.Model) -> Plan:
    """The plan at ``path`` (any registered kind), checked to fit both models."""
    path = Path(path)
    plan = load_plan(path)
    try:
        plan.check_fits(original)
    except PlanError as exc:
        raise PlanError(f"{path} does not fit ORIGINAL: {exc}") from None
    applied = optimized.metadata_props.get(PROVENANCE_PLANS, "").split(",")
    if plan.SCHEMA not in applied:
        raise PlanError(
            f"{path}: OPTIMIZED was not made by a {plan.SCHEMA} plan "
            f"(it records {', '.join(p for p in applied if p) or 'none'})"
        )
    return plan
