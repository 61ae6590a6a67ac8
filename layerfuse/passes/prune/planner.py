"""Choose what to prune: the layer-dropping baseline every merge and fusion is judged against.

Budget: a number of blocks/sublayers, or a number of parameters (e.g. what a merge plan
removes), converted to a count using the model's own per-block sizes.

Selection:

- ``influence`` (ShortGPT's block influence): ``1 - cos(input, output)`` of each block (or
  sublayer) on the residual stream, averaged over calibration tokens; the least influential
  are dropped. One pass over the data.
- ``sliding``: a contiguous run, every position scored on validation data in memory (like
  the merge pass's window search).
"""

from __future__ import annotations

__all__ = ["PruneRequest", "block_influence", "plan_prune"]

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerfuse.data.batches import InputBatch
from layerfuse.errors import PlanError
from layerfuse.model.io import load_model, parameter_count
from layerfuse.passes.detect import ModelStructure, detect_structure
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings, search_best
from layerfuse.passes.prune.plan import PrunePlan
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import ActivationTap, stream_rows
from layerfuse.runtime.quality import row_cosine

SELECTIONS = ("influence", "sliding")


@dataclass
class PruneRequest:
    target: str = "block"
    count: int | None = None
    parameters: int | None = None
    blocks: list[int] | None = None
    select: str = "influence"
    data: DataSettings = field(default_factory=DataSettings)


def _unit_parameters(structure: ModelStructure, target: str) -> list[int]:
    units = []
    for block in structure.blocks:
        attention = 0 if block.attention is None else block.attention.parameter_count
        units.append(
            {"ff": block.ff.parameter_count, "attention": attention}.get(
                target, block.ff.parameter_count + attention
            )
        )
    return units


def _count(structure: ModelStructure, request: PruneRequest) -> int:
    if request.count is not None and request.parameters is not None:
        raise PlanError("give either a count or a parameter budget, not both")
    if request.count is not None:
        count = request.count
    elif request.parameters is not None:
        per_unit = float(np.mean(_unit_parameters(structure, request.target)))
        count = max(1, round(request.parameters / per_unit))
    else:
        raise PlanError("say how much to prune: a count, a parameter budget or explicit blocks")
    if count < 1:
        raise PlanError(f"cannot prune {count} {request.target}s")
    return count


def _stream_pairs(structure: ModelStructure, target: str) -> list[tuple[str, str, str | None]]:
    """(input, output, branch) residual-stream tensors per block for the influence score.

    In a parallel block the stream without one sublayer exists nowhere in the graph (both
    branches are added at once), so it is computed as output minus that sublayer's branch;
    ``branch`` names it, and is None where the input tensor exists.
    """
    pairs = []
    for block in structure.blocks:
        wirings = (
            [block.attention_wiring, block.ff_wiring] if block.attention else [block.ff_wiring]
        )
        if target != "block":
            wirings = [block.ff_wiring if target == "ff" else block.attention_wiring]
        if any(w is None or w.residual is None for w in wirings):
            notes = [note for w in wirings if w is not None for note in w.notes]
            why = "; ".join(notes) or "it has no such sublayer"
            raise PlanError(
                f"block {block.index}: cannot trace the residual stream around it: {why}"
            )
        branch = None
        if target == "block":
            start, end = block.stream_in, block.stream_out
        else:
            start, end = wirings[0].residual.operand, wirings[0].residual.output
            if wirings[0].parallel:
                branch = wirings[0].branch.addend.name
        pairs.append((start.name, end.name, branch))
    return pairs


def block_influence(
    model_path: str | os.PathLike,
    target: str,
    batches: list[InputBatch],
    *,
    provider: str = "auto",
    reporter: Reporter = SILENT,
) -> list[float]:
    """ShortGPT block influence, ``1 - mean cos(input, output)``, per block or sublayer."""
    structure = detect_structure(load_model(model_path))
    pairs = _stream_pairs(structure, target)
    names = sorted({name for pair in pairs for name in pair if name is not None})
    tap = ActivationTap(model_path, names, provider=provider, model_outputs=False)
    sums, count = np.zeros(len(pairs)), 0
    for rows in stream_rows(
        tap, batches, total=len(batches), reporter=reporter, description="block influence"
    ):
        for index, (start, end, branch) in enumerate(pairs):
            before = rows[start] if branch is None else rows[end] - rows[branch]
            sums[index] += float((1.0 - row_cosine(before, rows[end])).sum())
        count += next(iter(rows.values())).shape[0]
    return (sums / max(count, 1)).tolist()


def _parameters_removed(model_path: Path, plan: PrunePlan) -> int:
    return parameter_count(load_model(model_path)) - parameter_count(apply_plan(model_path, plan))


def plan_prune(
    model_path: str | os.PathLike, request: PruneRequest, reporter: Reporter = SILENT
) -> PrunePlan:
    """Analyse the model at ``model_path`` and return a prune plan (nothing is written)."""
    model_path = Path(model_path)
    structure = detect_structure(load_model(model_path))
    num_blocks = len(structure.blocks)
    settings = request.data

    def make(blocks: list[int], selection: dict | None = None) -> PrunePlan:
        return PrunePlan(structure.fingerprint, num_blocks, request.target, blocks, selection)

    if request.select not in SELECTIONS:
        raise PlanError(f"unknown selection '{request.select}' (choose {', '.join(SELECTIONS)})")
    if request.blocks is not None:
        plan = make(list(request.blocks), {"method": "fixed"})
    else:
        count = _count(structure, request)
        make(list(range(min(count, num_blocks))))  # validates the count before any work
        if request.select == "influence":
            scores = block_influence(
                model_path,
                request.target,
                settings.batches(model_path, "calib"),
                provider=settings.provider,
                reporter=reporter,
            )
            chosen = sorted(np.argsort(scores, kind="stable")[:count].tolist())
            plan = make(chosen, {"method": "influence", "scores": scores})
        else:
            scorer = settings.scorer(model_path)
            starts = list(range(num_blocks - count + 1))
            best, scores = search_best(
                starts,
                lambda start: apply_plan(model_path, make(list(range(start, start + count)))),
                scorer,
                reporter,
                "scoring prune positions",
            )
            candidates = [{"start": s, "score": v} for s, v in zip(starts, scores, strict=True)]
            selection = {"method": "sliding", "metric": scorer.metric, "candidates": candidates}
            plan = make(list(range(best, best + count)), selection)
    plan.parameters_removed = _parameters_removed(model_path, plan)
    return plan
