"""Every kind of plan layerfuse applies, in one place.

Code that must handle any plan (recovery's provenance check, loading a plan whose kind is
only known from its file) reads this list, so a new pass is registered here once instead of
in every reader.
"""

from __future__ import annotations

__all__ = ["PLAN_CLASSES", "load_plan", "plan_class_for"]

import json
import os
from pathlib import Path

from layerfuse.errors import PlanError
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergePlan
from layerfuse.passes.plan import Plan
from layerfuse.passes.prune import PrunePlan
from layerfuse.passes.share_kv import ShareKVPlan

PLAN_CLASSES: tuple[type[Plan], ...] = (MergePlan, PrunePlan, FusePlan, ShareKVPlan)


def plan_class_for(schema: str | None) -> type[Plan] | None:
    """The plan class that reads ``schema`` (its own or an older one), if any."""
    return next((c for c in PLAN_CLASSES if schema in (c.SCHEMA, *c.READS)), None)


def load_plan(path: str | os.PathLike) -> Plan:
    """The plan saved at ``path``, whatever its kind (read from its ``schema``)."""
    path = Path(path)
    try:
        schema = json.loads(path.read_text()).get("schema")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc})") from None
    chosen = plan_class_for(schema)
    if chosen is None:
        kinds = ", ".join(c.SCHEMA for c in PLAN_CLASSES)
        raise PlanError(f"{path}: not a layerfuse plan (schema {schema!r}; one of {kinds})")
    return chosen.load(path)
