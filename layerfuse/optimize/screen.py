"""Screen candidates without training: plan each, apply it in memory, score it on validation.

Each candidate is planned by its own planner (merge: aligned windows at the best-scoring
position; prune: block influence; fuse: the best window of attention to remove, then the FFN
runs it leaves), exactly as ``layerfuse merge``/``prune``/``fuse`` would plan it, and its
plan is saved. The rewrite is scored in memory by the planners' validation scorer
(perplexity for causal LMs, ``1 - output cosine`` for encoders), counted (parameters, weight
bytes) and, for a latency target, timed at the named shape against the original.
"""

from __future__ import annotations

__all__ = ["ScreenContext", "plan_candidate", "screen_candidate", "screen_original"]

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from layerfuse.model.io import load_model, parameter_count, save_model, weight_bytes
from layerfuse.model.manifest import carry_manifest
from layerfuse.optimize.candidates import Candidate
from layerfuse.optimize.finalists import apply_plans
from layerfuse.optimize.targets import Target
from layerfuse.passes.fuse import FuseRequest, plan_fuse
from layerfuse.passes.merge import MergePlan, MergeRequest, plan_merge
from layerfuse.passes.plan import Plan, apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import Reporter
from layerfuse.runtime.calibration import adapt_feeds
from layerfuse.runtime.inputs import parse_shapes, synthetic_feeds
from layerfuse.runtime.measure import measure_latency
from layerfuse.runtime.session import session_for_ir


@dataclass
class ScreenContext:
    """What screening every candidate shares."""

    model_path: Path
    data: DataSettings
    scorer: CandidateScorer
    target: Target
    shape: str
    latency_runs: int
    num_blocks: int
    folder: Path

    def latency_ms(self, model) -> float:
        session = session_for_ir(model, self.model_path.parent, provider=self.data.provider)
        feeds = synthetic_feeds(self.model_path, parse_shapes(self.shape)[0])
        return measure_latency(session, adapt_feeds(session, feeds), runs=self.latency_runs).p50_ms


def plan_candidate(candidate: Candidate, context: ScreenContext, reporter: Reporter) -> Plan:
    """The candidate's plan, made by the same planner its command uses."""
    options = candidate.options
    relax_of = options.get("relax_of")
    if relax_of and (context.folder / relax_of / "plan.json").is_file():
        return _relaxed(candidate, context)
    if candidate.kind == "merge":
        request = MergeRequest(
            ratio=f"{options['removed']}/{context.num_blocks}",
            windows=options["windows"],
            method=options["method"],
            relax_rank=options["relax_rank"],
            data=context.data,
        )
        return plan_merge(context.model_path, request, reporter)
    if candidate.kind == "fuse":
        request = FuseRequest(drop_attention=options["count"], contiguous=True, data=context.data)
        return plan_fuse(context.model_path, request, reporter)
    target = options.get("target", "attention")
    request = PruneRequest(
        target=target,
        count=options["count"],
        select=options.get("select", "influence"),
        data=context.data,
    )
    return plan_prune(context.model_path, request, reporter)


def _relaxed(candidate: Candidate, context: ScreenContext) -> Plan:
    """The plain sibling's merge plan with each tied layer's rank-R deltas added."""
    plain = MergePlan.load(context.folder / candidate.options["relax_of"] / "plan.json")
    plan = replace(
        plain, relax_rank=candidate.options["relax_rank"], relax_init="svd", validation=None
    )
    model = apply_plan(context.model_path, plan)
    original = load_model(context.model_path)
    plan.parameters_removed = parameter_count(original) - parameter_count(model)
    plan.bytes_removed = weight_bytes(original) - weight_bytes(model)
    return plan


def _measure(model, context: ScreenContext) -> dict:
    result = {
        "score": context.scorer(model),
        "parameters": parameter_count(model),
        "weight_bytes": weight_bytes(model),
    }
    if context.target.kind == "latency":
        result["latency_ms"] = context.latency_ms(model)
    return result


def screen_original(context: ScreenContext) -> dict:
    """The original's validation score, size and (for latency targets) time."""
    return {**_measure(load_model(context.model_path), context), "metric": context.scorer.metric}


def _hybrid_plans(
    candidate: Candidate, context: ScreenContext, folder: Path, reporter: Reporter
) -> list[Path]:
    """Prune first, then plan the merge on the pruned model as ``merge`` would plan it there."""
    options = candidate.options
    prune = plan_prune(
        context.model_path,
        PruneRequest(count=options["count"], select=options["select"], data=context.data),
        reporter,
    )
    pruned = folder / "pruned" / "model.onnx"
    save_model(apply_plan(context.model_path, prune), pruned)
    carry_manifest(context.model_path, pruned)
    left = context.num_blocks - options["count"]
    request = MergeRequest(
        ratio=f"{options['removed']}/{left}", windows=1, method=options["method"],
        data=context.data,
    )  # fmt: skip
    merge = plan_merge(pruned, request, reporter)
    shutil.rmtree(pruned.parent)
    return [prune.save(folder / "plan.json"), merge.save(folder / "plan-2.json")]


def screen_candidate(
    candidate: Candidate, context: ScreenContext, original: dict, folder: Path, reporter: Reporter
) -> dict:
    """Plan, save the plans in ``folder``, score the rewrite; the candidate's screening record."""
    started = time.perf_counter()
    if candidate.kind == "hybrid":
        plans = _hybrid_plans(candidate, context, folder, reporter)
    else:
        plans = [plan_candidate(candidate, context, reporter).save(folder / "plan.json")]
    result = _measure(apply_plans(context.model_path, plans), context)
    result["params_ratio"] = result["parameters"] / original["parameters"]
    result["score_ratio"] = result["score"] / original["score"] if original["score"] else None
    speedup = None
    if "latency_ms" in result:
        speedup = original["latency_ms"] / result["latency_ms"]
        result["speedup"] = speedup
    result["meets_target"] = context.target.met(
        result["params_ratio"], speedup, result["weight_bytes"]
    )
    result["plan"] = str(plans[0])
    if len(plans) > 1:
        result["plans"] = [str(path) for path in plans]
    result["seconds"] = time.perf_counter() - started
    return result
