"""Aligned FF merging (Verma, Murray & Duh): plan (analysis) and tie (rewrite)."""

from layerfuse.passes.merge.plan import MergePlan, MergeWindow
from layerfuse.passes.merge.planner import MergeRequest, apply_merge_plan, plan_merge
from layerfuse.passes.merge.tie import TieFeedForwardsPass

__all__ = [
    "MergePlan",
    "MergeRequest",
    "MergeWindow",
    "TieFeedForwardsPass",
    "apply_merge_plan",
    "plan_merge",
]
