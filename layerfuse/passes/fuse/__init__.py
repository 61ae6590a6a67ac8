"""FFN Fusion (NVIDIA, arXiv 2503.18908): remove attention, fuse FFN runs into one wide FFN."""

from layerfuse.passes.fuse.plan import FusePlan
from layerfuse.passes.fuse.planner import (
    FuseRequest,
    apply_fuse_plan,
    attention_importance,
    dependency_matrix,
    find_runs,
    plan_fuse,
)
from layerfuse.passes.fuse.rewrite import FuseFeedForwardsPass, parallel_reference

__all__ = [
    "FuseFeedForwardsPass",
    "FusePlan",
    "FuseRequest",
    "apply_fuse_plan",
    "attention_importance",
    "dependency_matrix",
    "find_runs",
    "parallel_reference",
    "plan_fuse",
]
