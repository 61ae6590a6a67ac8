"""Every kind of plan layerfuse applies, in one place.

Code that must handle any plan (recovery's provenance check, loading a plan whose kind is
only known from its file) reads this list, so a new pass is registered here once instead of
in every reader.
"""

from __future__ import annotations

__all__ = ["PLAN_CLASSES", "plan_class_for"]

from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergePlan
from layerfuse.passes.plan import Plan
from layerfuse.passes.prune import PrunePlan
from layerfuse.passes.share_kv import ShareKVPlan

PLAN_CLASSES: tuple[type[Plan], ...] = (MergePlan, PrunePlan, FusePlan, ShareKVPlan)


def plan_class_for(schema: str | None) -> type[Plan] | None:
    """The plan class that reads ``schema`` (its own or an older one), if any."""
    return next((c for c in PLAN_CLASSES if schema in (c.SCHEMA, *c.READS)), None)
