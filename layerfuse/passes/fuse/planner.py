"""Analysis for FFN Fusion: which attention to remove, which runs to fuse, how dependent.

1. Attention importance (:mod:`layerfuse.passes.fuse.attention`): each attention sublayer is
   removed alone (in memory) and the model is scored on validation data; the smallest
   degradation marks the least important sublayer (the practical stand-in for the paper's
   Puzzle search). ``drop_attention`` takes the N least important, or with ``"auto"`` adds
   them in that order while the validation score stays within ``tolerance`` of the original;
   with ``contiguous`` the best window of N consecutive sublayers goes instead.
2. Runs: maximal sequences of FFN sublayers with no attention between them. The paper leaves
   the last FFN of each run out of the fusion (``include_last=False``).
3. Dependency: for blocks i < j of a run, how much FFN j's output changes (mean cosine
   distance over calibration tokens) when FFN i is removed. Low values mean the FFNs barely
   feed each other and can run in parallel; with ``max_dependency`` a run is split where a
   member depends on an earlier one more than that.
"""

from __future__ import annotations

__all__ = [
    "FuseRequest",
    "attention_importance",
    "dependency_matrix",
    "find_runs",
    "plan_fuse",
]

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from layerfuse.data.batches import InputBatch
from layerfuse.errors import PlanError
from layerfuse.model.io import load_model
from layerfuse.passes.blocks import check_ranges
from layerfuse.passes.detect import ModelStructure, detect_structure
from layerfuse.passes.fuse.attention import Reducer, attention_importance, choose_attention
from layerfuse.passes.fuse.plan import FusePlan, fused_members
from layerfuse.passes.fuse.rewrite import fusion_problem
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.sublayers import remove_sublayers
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import ActivationTap, token_rows
from layerfuse.runtime.quality import row_cosine


@dataclass
class FuseRequest:
    """What the user asked for; :func:`plan_fuse` turns it into a :class:`FusePlan`.

    ``drop_attention``: None (keep all), a count, ``"auto"``, or explicit blocks.
    ``fuse``: ``"auto"`` (every FFN-only run found) or explicit block ranges.
    """

    drop_attention: int | str | list[int] | None = None
    contiguous: bool = False
    fuse: str | list[tuple[int, int]] = "auto"
    include_last: bool = False
    max_dependency: float | None = None
    tolerance: float = 0.1
    data: DataSettings = field(
        default_factory=lambda: DataSettings(calib_tokens=2048, valid_tokens=2048)
    )


def find_runs(structure: ModelStructure) -> list[tuple[int, int]]:
    """Maximal (first, last) block ranges whose FFNs have no attention between them."""
    runs, start = [], 0
    for block in structure.blocks[1:]:
        if block.attention is not None:
            if block.index - 1 > start:
                runs.append((start, block.index - 1))
            start = block.index
    if structure.blocks[-1].index > start:
        runs.append((start, structure.blocks[-1].index))
    return runs


def dependency_matrix(
    reduce: Reducer,
    dropped: list[int],
    run: tuple[int, int],
    batches: list[InputBatch],
    provider: str,
) -> np.ndarray:
    """``M[i, j]``: mean cosine distance of FFN j's output with and without FFN i (i < j),
    in the model without the ``dropped`` attention sublayers."""
    first, last = run
    structure = detect_structure(reduce(dropped))
    members = list(range(first, last + 1))
    names = [structure.blocks[b].ff.output.name for b in members]
    model_dir = reduce.model_path.parent

    def outputs(candidate: ir.Model, wanted: list[str]) -> list[dict[str, np.ndarray]]:
        tap = ActivationTap(
            candidate,
            wanted,
            provider=provider,
            external_data_dir=model_dir,
            model_outputs=False,
        )
        collected = []
        for batch in batches:
            tapped = tap.tapped(batch.feeds)
            collected.append({n: token_rows(v, batch.mask) for n, v in tapped.items()})
        return collected

    reference = outputs(reduce(dropped), names)
    matrix = np.zeros((len(members), len(members)))
    for row, removed in enumerate(members[:-1]):
        candidate = reduce(dropped)
        remove_sublayers(candidate, "ff", [removed])
        changed = outputs(candidate, names[row + 1 :])
        for column in range(row + 1, len(members)):
            name = names[column]
            distances = [
                1.0 - row_cosine(base[name], new[name])
                for base, new in zip(reference, changed, strict=True)
            ]
            matrix[row, column] = float(np.concatenate(distances).mean())
    return matrix


def _split_by_dependency(
    members: list[int], first: int, matrix: np.ndarray | None, threshold: float
) -> list[tuple[int, int]]:
    groups, current = [], [members[0]] if members else []
    for block in members[1:]:
        depends = matrix is not None and any(
            matrix[earlier - first, block - first] > threshold for earlier in current
        )
        if depends:
            if len(current) >= 2:
                groups.append((current[0], current[-1]))
            current = [block]
        else:
            current.append(block)
    if len(current) >= 2:
        groups.append((current[0], current[-1]))
    return groups


def _explicit_drop(structure: ModelStructure, blocks: list[int]) -> list[int]:
    num_blocks = len(structure.blocks)
    missing = [
        b for b in blocks if not 0 <= b < num_blocks or structure.blocks[b].attention is None
    ]
    if missing:
        raise PlanError(f"block {missing[0]} has no attention sublayer to drop")
    return sorted(blocks)


def _what_to_fuse(
    candidates: list[tuple[int, int]], request: FuseRequest, dependency: list[dict]
) -> list[tuple[int, int]]:
    """Each candidate run, without its last FFN unless ``include_last``, split by dependency."""
    fuse = []
    for first, last in candidates:
        members = list(fused_members(first, last, request.include_last))
        if request.max_dependency is not None:
            matrix = next(
                (np.asarray(d["matrix"]) for d in dependency if d["run"] == [first, last]), None
            )
            fuse.extend(_split_by_dependency(members, first, matrix, request.max_dependency))
        elif len(members) >= 2:
            fuse.append((members[0], members[-1]))
    return fuse


def plan_fuse(
    model_path: str | os.PathLike, request: FuseRequest, reporter: Reporter = SILENT
) -> FusePlan:
    """Analyse the model at ``model_path`` and return a fusion plan (nothing is written).

    Chooses the attention sublayers to remove (explicit, scored or none), finds the FFN-only
    runs that leaves, measures block dependency inside them when it decides anything, and
    checks the resulting plan against the model before returning it.
    """
    model_path = Path(model_path)
    settings = request.data
    structure = detect_structure(load_model(model_path))
    _refuse_unfusable(structure)
    num_blocks = len(structure.blocks)
    reduce = Reducer(model_path, structure)
    scores, baseline, metric, dropped = None, None, None, []
    if isinstance(request.drop_attention, list):
        dropped = _explicit_drop(structure, request.drop_attention)
    elif request.drop_attention is not None:
        scorer = settings.scorer(model_path)
        dropped, scores, baseline = choose_attention(reduce, request, scorer, reporter)
        metric = scorer.metric
    runs = find_runs(detect_structure(reduce(dropped)))
    if request.fuse == "auto":
        candidates = runs
    else:
        candidates = check_ranges(request.fuse, num_blocks, min_length=2, what="run")
    dependency = []
    if request.max_dependency is not None or request.fuse == "auto":
        batches = settings.batches(model_path, "calib")
        for run in reporter.track(candidates, len(candidates), "block dependency"):
            matrix = dependency_matrix(reduce, dropped, run, batches, settings.provider)
            dependency.append({"run": list(run), "matrix": matrix.tolist()})
    plan = FusePlan(
        fingerprint=structure.fingerprint,
        num_blocks=num_blocks,
        drop_attention=dropped,
        fuse=_what_to_fuse(candidates, request, dependency),
        ffn_only_runs=runs,
        include_last=request.include_last,
        attention_scores=scores,
        metric=metric,
        baseline_score=baseline,
        dependency=dependency,
    )
    if not plan.fuse:
        raise PlanError(
            f"nothing to fuse: after removing the attention of blocks {dropped or 'none'} the "
            f"FFN-only runs are {runs or 'none'}, and fusion needs a run of 2 or more FFNs "
            f"(3 or more without --include-last); remove more attention (--drop-attention N), "
            f"or use 'layerfuse prune --target attention' to remove attention alone"
        )
    plan.rewrite_pass().requires(load_model(model_path))
    return plan


def _refuse_unfusable(structure: ModelStructure) -> None:
    """Refuse before any calibration when the wiring alone rules fusion out."""
    problems = [fusion_problem(block.ff_wiring) for block in structure.blocks]
    if all(problem is not None for problem in problems):
        raise PlanError(
            f"no FFN of this model can be fused: block 0: {problems[0]}; "
            f"'layerfuse prune --target attention' removes attention without fusing"
        )
