"""Planners over :class:`~layerfuse.api.model.Model`: analysis in, a reviewable plan out.

Each takes a model and either a request dataclass or its fields as keywords (``ratio="1/3"``
is ``MergeRequest(ratio="1/3")``), runs the same planner the CLI runs, and returns the plan
without changing the model; ``plan.apply(model)`` rewrites it, ``plan.save(path)`` keeps it.

Example::

    import layerfuse

    model = layerfuse.load("smollm2/model.onnx")
    plan = layerfuse.plan_merge(model, ranges=[(20, 29)], method="permute")
    plan.save("merge.plan.json")
    plan.apply(model).save("merged/model.onnx")
"""

from __future__ import annotations

__all__ = ["plan_fuse", "plan_merge", "plan_prune", "plan_share_kv"]

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from layerfuse.api.model import Model
from layerfuse.errors import LayerfuseError
from layerfuse.passes import fuse, merge, prune, share_kv
from layerfuse.passes.plan import Plan
from layerfuse.progress import SILENT, Reporter

Request = TypeVar("Request")


def _request(kind: type[Request], request: Request | None, options: dict[str, Any]) -> Request:
    """``request`` as given, or one built from keyword options (not both)."""
    if request is not None and options:
        raise LayerfuseError(f"give a {kind.__name__} or its fields as keywords, not both")
    if request is not None:
        return request
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(options) - known)
    if unknown:
        fields = ", ".join(sorted(known))
        raise LayerfuseError(f"{kind.__name__} has no field {', '.join(unknown)} ({fields})")
    return kind(**options)


def _plan(planner: Callable[..., Plan], model: Model, request: object, reporter: Reporter) -> Plan:
    with model.on_disk() as path:
        return planner(path, request, reporter)


def plan_merge(
    model: Model,
    request: merge.MergeRequest | None = None,
    *,
    reporter: Reporter = SILENT,
    **options: Any,
) -> merge.MergePlan:
    """Align and tie FF sublayers (:class:`~layerfuse.passes.merge.MergeRequest` fields:
    ``ratio``, ``ranges``, ``method``, ``relax_rank``, ``data``, ...)."""
    request = _request(merge.MergeRequest, request, options)
    return _plan(merge.plan_merge, model, request, reporter)


def plan_prune(
    model: Model,
    request: prune.PruneRequest | None = None,
    *,
    reporter: Reporter = SILENT,
    **options: Any,
) -> prune.PrunePlan:
    """Remove blocks, FFs or attention (:class:`~layerfuse.passes.prune.PruneRequest`
    fields: ``target``, ``count``, ``parameters``, ``blocks``, ``select``, ``data``)."""
    request = _request(prune.PruneRequest, request, options)
    return _plan(prune.plan_prune, model, request, reporter)


def plan_fuse(
    model: Model,
    request: fuse.FuseRequest | None = None,
    *,
    reporter: Reporter = SILENT,
    **options: Any,
) -> fuse.FusePlan:
    """FFN Fusion (:class:`~layerfuse.passes.fuse.FuseRequest` fields: ``drop_attention``,
    ``fuse``, ``max_dependency``, ``data``, ...)."""
    request = _request(fuse.FuseRequest, request, options)
    return _plan(fuse.plan_fuse, model, request, reporter)


def plan_share_kv(
    model: Model,
    request: share_kv.ShareKVRequest | None = None,
    *,
    reporter: Reporter = SILENT,
    **options: Any,
) -> share_kv.ShareKVPlan:
    """Cross-layer KV sharing (:class:`~layerfuse.passes.share_kv.ShareKVRequest` fields:
    ``layers``, ``tolerance``, ``data``)."""
    request = _request(share_kv.ShareKVRequest, request, options)
    return _plan(share_kv.plan_share_kv, model, request, reporter)
