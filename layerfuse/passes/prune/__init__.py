"""Layer pruning: drop whole blocks, FF sublayers or attention sublayers (the baseline)."""

from layerfuse.passes.prune.plan import TARGETS, PrunePlan
from layerfuse.passes.prune.planner import PruneRequest, block_influence, plan_prune
from layerfuse.passes.prune.rewrite import PruneSublayersPass

__all__ = [
    "TARGETS",
    "PrunePlan",
    "PruneRequest",
    "PruneSublayersPass",
    "block_influence",
    "plan_prune",
]
