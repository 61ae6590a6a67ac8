"""Aligned FF merging (Verma, Murray & Duh): plan (analysis), tie (rewrite), refit."""

from layerfuse.passes.merge.plan import FEATURES, MergePlan, MergeWindow
from layerfuse.passes.merge.planner import MergeRequest, plan_merge
from layerfuse.passes.merge.tie import TieFeedForwardsPass

__all__ = [
    "FEATURES",
    "MergePlan",
    "MergeRequest",
    "MergeWindow",
    "TieFeedForwardsPass",
    "plan_merge",
]
