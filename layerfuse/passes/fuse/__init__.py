"""FFN Fusion (NVIDIA, arXiv 2503.18908): remove attention, fuse FFN runs into one wide FFN."""

from layerfuse.passes.fuse.plan import FusePlan
from layerfuse.passes.fuse.planner import (
    FuseRequest,
    attention_importance,
    dependency_matrix,
    find_runs,
    plan_fuse,
)
from layerfuse.passes.fuse.rewrite import FuseFeedForwardsPass

__all__ = [
    "FuseFeedForwardsPass",
    "FusePlan",
    "FuseRequest",
    "attention_importance",
    "dependency_matrix",
    "find_runs",
    "plan_fuse",
]
