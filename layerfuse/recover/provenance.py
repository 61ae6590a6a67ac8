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

import json
import os
from pathlib import Path

import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.model.fingerprint import fingerprint
from layerfuse.passes.base import PROVENANCE_PLANS, source_fingerprint
from layerfuse.passes.plan import Plan
from layerfuse.passes.registry import PLAN_CLASSES, plan_class_for


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
    try:
        schema = json.loads(path.read_text()).get("schema")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc})") from None
    chosen = plan_class_for(schema)
    if chosen is None:
        kinds = ", ".join(c.SCHEMA for c in PLAN_CLASSES)
        raise PlanError(f"{path}: not a layerfuse plan (schema {schema!r}; one of {kinds})")
    plan = chosen.load(path)
    try:
        plan.check_fits(original)
    except PlanError as exc:
        raise PlanError(f"{path} does not fit ORIGINAL: {exc}") from None
    applied = optimized.metadata_props.get(PROVENANCE_PLANS, "").split(",")
    if chosen.SCHEMA not in applied:
        raise PlanError(
            f"{path}: OPTIMIZED was not made by a {chosen.SCHEMA} plan "
            f"(it records {', '.join(p for p in applied if p) or 'none'})"
        )
    return plan
