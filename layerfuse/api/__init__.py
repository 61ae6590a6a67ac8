"""The Python API: load a model, plan and apply rewrites in memory, recover, measure, save.

Everything here is also what the CLI runs; see ``docs/api.md`` for a walk-through.
"""

from layerfuse.api.features import Recovery, bench, evaluate, quantize, recover_model
from layerfuse.api.model import Model, load
from layerfuse.api.planning import plan_fuse, plan_merge, plan_prune, plan_share_kv
from layerfuse.passes.registry import load_plan

__all__ = [
    "Model",
    "Recovery",
    "bench",
    "evaluate",
    "load",
    "load_plan",
    "plan_fuse",
    "plan_merge",
    "plan_prune",
    "plan_share_kv",
    "quantize",
    "recover_model",
]
