"""Cross-layer KV sharing: later attention layers read earlier layers' keys and values."""

from layerfuse.passes.share_kv.layers import KVLayer, kv_layers
from layerfuse.passes.share_kv.plan import ShareKVPlan
from layerfuse.passes.share_kv.planner import ShareKVRequest, kv_similarity, plan_share_kv

__all__ = [
    "KVLayer",
    "ShareKVPlan",
    "ShareKVRequest",
    "kv_layers",
    "kv_similarity",
    "plan_share_kv",
]
