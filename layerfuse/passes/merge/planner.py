"""Analysis for aligned FF merging: calibrate, align, choose windows, optionally refit.

1. Calibration: the FF activations chosen by ``features`` (by default the tensor before the
   nonlinearity) are tapped from the original graph on calibration text and reduced to
   pairwise correlation statistics batch by batch.
2. Alignment: for each window, every non-anchor FF gets the permutation of its neurons that
   maximizes total correlation with the anchor's (``linear_sum_assignment``).
3. Selection: with ``select="sliding"`` every window position is merged in memory and scored
   on validation data (perplexity for causal LMs, output fidelity to the original otherwise);
   the best is kept and all scores are recorded in the plan. Several windows are placed one
   after the other, each given the ones already placed.
4. Refit (:mod:`layerfuse.passes.merge.refit`), kept only if validation improves.
"""

from __future__ import annotations

__all__ = ["FEATURE_TENSORS", "MergeRequest", "plan_merge"]

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerfuse.data.batches import InputBatch
from layerfuse.errors import PlanError
from layerfuse.model.io import load_model, weight_bytes
from layerfuse.passes.blocks import check_ranges
from layerfuse.passes.detect import ModelStructure, detect_structure
from layerfuse.passes.merge.correlation import PairStatistics, align, pair_groups
from layerfuse.passes.merge.plan import (
    MergePlan,
    MergeWindow,
    anchor_of,
    parse_ratio,
    window_sizes,
)
from layerfuse.passes.merge.refit import refit_if_it_helps
from layerfuse.passes.merge.relax import delta_parameters
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings, search_best
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import ActivationTap, stream_rows

# Which tensor of an FF each ``features`` choice aligns neurons on.
FEATURE_TENSORS = {
    "pre_activation": lambda ff: ff.pre_activation,
    "up": lambda ff: ff.up.output,
    "hidden": lambda ff: ff.hidden,
}


@dataclass
class MergeRequest:
    """What the user asked for; :func:`plan_merge` turns it into a :class:`MergePlan`."""

    ratio: str = "1/3"
    windows: int = 1
    ranges: list[tuple[int, int]] | None = None
    method: str = "permute"
    anchor: str = "first"
    select: str = "sliding"
    features: str = "pre_activation"
    refit: bool = False
    data: DataSettings = field(default_factory=lambda: DataSettings(calib_tokens=10240))
    memory_budget_bytes: int = 2 * 1024**3
    # Relaxed tie: each tied layer's own rank-R delta per projection (0: a plain tie).
    relax_rank: int = 0
    relax_init: str = "svd"


def _candidate_windows(structure: ModelStructure, request: MergeRequest) -> list[list[list[int]]]:
    """Per window to place: the list of block runs it may cover."""
    num_blocks = len(structure.blocks)
    if request.ranges:
        ranges = check_ranges(request.ranges, num_blocks, min_length=2, what="window")
        return [[list(range(first, last + 1))] for first, last in ranges]
    removed = parse_ratio(request.ratio, num_blocks)
    sizes = window_sizes(removed, request.windows, num_blocks)
    if request.select == "sliding":
        return [
            [list(range(start, start + size)) for start in range(num_blocks - size + 1)]
            for size in sizes
        ]
    if request.select == "last":
        runs, end = [], num_blocks
        for size in reversed(sizes):
            runs.insert(0, [list(range(end - size, end))])
            end -= size
        return runs
    raise PlanError(f"unknown window selection '{request.select}' (choose sliding or last)")


def _calibrate(
    model_path: Path,
    structure: ModelStructure,
    pairs: list[tuple[int, int]],
    batches: list[InputBatch],
    request: MergeRequest,
    reporter: Reporter,
) -> dict[tuple[int, int], np.ndarray]:
    """Correlation matrices for ``pairs`` of blocks, in as many passes as memory requires."""
    involved = sorted({i for pair in pairs for i in pair})
    widths = {i: structure.blocks[i].ff.width for i in involved}
    tensor_of = FEATURE_TENSORS[request.features]
    features = {i: tensor_of(structure.blocks[i].ff).name for i in involved}
    correlations: dict[tuple[int, int], np.ndarray] = {}
    groups = pair_groups(pairs, widths, request.memory_budget_bytes)
    for number, group in enumerate(groups, start=1):
        blocks = sorted({i for pair in group for i in pair})
        tap = ActivationTap(
            model_path,
            [features[i] for i in blocks],
            provider=request.data.provider,
            model_outputs=False,
        )
        stats = PairStatistics({i: widths[i] for i in blocks}, group)
        label = "calibrating" if len(groups) == 1 else f"calibrating ({number}/{len(groups)})"
        for rows in stream_rows(
            tap, batches, total=len(batches), reporter=reporter, description=label
        ):
            stats.update({i: rows[features[i]] for i in blocks})
        for a, b in group:
            correlations[(a, b)] = stats.correlation(a, b)
    return correlations


def _window(blocks: list[int], request: MergeRequest, alignments: dict) -> MergeWindow:
    anchor = anchor_of(blocks, request.anchor)
    window = MergeWindow(blocks=blocks, anchor=anchor)
    if request.method == "permute":
        for block in blocks:
            if block == anchor:
                continue
            alignment = alignments[(anchor, block)]
            window.permutations[block] = alignment.permutation.tolist()
            window.matched_correlation[block] = alignment.matched_correlation
            window.identity_correlation[block] = alignment.identity_correlation
    return window


def _alignments(
    model_path: Path,
    structure: ModelStructure,
    candidates: list[list[list[int]]],
    batches: list[InputBatch],
    request: MergeRequest,
    reporter: Reporter,
) -> dict:
    """Alignment of every (anchor, member) pair any candidate window needs."""
    pairs = sorted(
        {
            (anchor_of(blocks, request.anchor), b)
            for options in candidates
            for blocks in options
            for b in blocks
            if b != anchor_of(blocks, request.anchor)
        }
    )
    tokens = sum(b.rows for b in batches)
    reporter.step(f"aligning {len(pairs)} FF pairs on {tokens} calibration tokens")
    correlations = _calibrate(model_path, structure, pairs, batches, request, reporter)
    return {
        pair: align(correlations.pop(pair))
        for pair in reporter.track(pairs, len(pairs), "linear assignment")
    }


def _select_windows(
    model_path: Path,
    base_plan: dict,
    candidates: list[list[list[int]]],
    alignments: dict,
    scorer: CandidateScorer | None,
    request: MergeRequest,
    reporter: Reporter,
) -> tuple[list[MergeWindow], list]:
    """Place windows one after the other, each at its best-scoring free position."""
    chosen: list[MergeWindow] = []
    selection_scores = []
    for all_options in candidates:
        placed = {b for window in chosen for b in window.blocks}
        options = [
            _window(blocks, request, alignments)
            for blocks in all_options
            if not placed & set(blocks)
        ]
        if not options:
            raise PlanError("the windows do not fit into the model without overlapping")
        if len(options) == 1:
            chosen.append(options[0])
            continue
        best, scores = search_best(
            options,
            lambda window: apply_plan(
                model_path, MergePlan(**base_plan, windows=[*chosen, window])
            ),
            scorer,
            reporter,
            "scoring window positions",
        )
        chosen.append(best)
        selection_scores.append(
            [
                {"blocks": [w.blocks[0], w.blocks[-1]], "score": s}
                for w, s in zip(options, scores, strict=True)
            ]
        )
    return chosen, selection_scores


def _validate(model_path: Path, base_plan: dict, candidates: list[list[list[int]]]) -> None:
    """Check method, anchor and every candidate window's shapes before any expensive step."""
    model = load_model(model_path)
    for options in candidates:
        for blocks in options:
            window = MergeWindow(blocks, anchor_of(blocks, base_plan["anchor"]))
            MergePlan(**base_plan, windows=[window]).rewrite_pass().requires(model)


def plan_merge(
    model_path: str | os.PathLike, request: MergeRequest, reporter: Reporter = SILENT
) -> MergePlan:
    """Analyse the model at ``model_path`` and return a merge plan (nothing is written)."""
    model_path = Path(model_path)
    settings = request.data
    structure = detect_structure(load_model(model_path))
    candidates = _candidate_windows(structure, request)
    base_plan = {
        "fingerprint": structure.fingerprint,
        "num_blocks": len(structure.blocks),
        "method": request.method,
        "anchor": request.anchor,
        "features": request.features,
        "relax_rank": request.relax_rank,
        "relax_init": request.relax_init,
    }
    if request.refit and request.relax_rank:
        raise PlanError("--refit and --relax-rank cannot be combined: the refit models a plain tie")
    _validate(model_path, base_plan, candidates)
    needs_calibration = request.method == "permute" or request.refit
    calibration = settings.batches(model_path, "calib") if needs_calibration else []
    alignments = {}
    if request.method == "permute":
        alignments = _alignments(model_path, structure, candidates, calibration, request, reporter)
    scorer = None
    if request.refit or any(len(options) > 1 for options in candidates):
        scorer = settings.scorer(model_path)
    chosen, selection_scores = _select_windows(
        model_path, base_plan, candidates, alignments, scorer, request, reporter
    )
    plan = MergePlan(**base_plan, windows=chosen)
    if calibration:
        plan.calibration = {"data": settings.data, "tokens": sum(b.rows for b in calibration)}
    if selection_scores:
        plan.selection = {
            "method": request.select,
            "metric": scorer.metric,
            "split": "valid",
            "candidates": selection_scores,
        }
    if request.refit:
        refit_if_it_helps(
            model_path, plan, calibration, scorer, provider=settings.provider, reporter=reporter
        )
    merged = apply_plan(model_path, plan)
    plan.bytes_removed = weight_bytes(load_model(model_path)) - weight_bytes(merged)
    if scorer is not None:
        plan.validation = {
            "metric": scorer.metric,
            "original": scorer(load_model(model_path)),
            "merged": scorer(merged),
        }
    plan.parameters_removed = sum(
        (len(w.blocks) - 1) * structure.blocks[w.anchor].ff.parameter_count
        - len(w.blocks) * delta_parameters(structure.blocks[w.anchor].ff, plan.relax_rank)
        for w in plan.windows
    )
    return plan
