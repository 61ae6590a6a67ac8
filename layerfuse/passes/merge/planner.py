"""Analysis for aligned FF merging: calibrate, align, choose windows, optionally refit.

1. Calibration: the FF activations just before the nonlinearity are tapped from the original
   graph on calibration text and reduced to pairwise correlation statistics batch by batch.
2. Alignment: for each window, every non-anchor FF gets the permutation of its neurons that
   maximizes total correlation with the anchor's (``linear_sum_assignment``).
3. Selection: with ``select="sliding"`` every window position is merged in memory and scored
   on validation data (perplexity for causal LMs, output fidelity to the original otherwise);
   the best is kept and all scores are recorded in the plan. Several windows are placed one
   after the other, each given the ones already placed.
4. Refit (beyond the paper, training-free): the shared output projection is refitted by least
   squares so that the tied FFs reproduce, on their actual inputs in the merged model, what
   the original FFs would output. It is kept only if the validation score improves.
"""

from __future__ import annotations

__all__ = [
    "MergeRequest",
    "apply_merge_plan",
    "plan_merge",
    "refit_down_projections",
    "refit_systems",
    "score_candidate",
]

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from layerfuse.data.batches import InputBatch, make_batches
from layerfuse.errors import PlanError
from layerfuse.model.io import load_model, weight_bytes
from layerfuse.passes.detect import ModelStructure, detect_structure
from layerfuse.passes.merge.correlation import PairStatistics, align, pair_groups
from layerfuse.passes.merge.ff_weights import ff_forward, hidden_activations, read_ff_weights
from layerfuse.passes.merge.plan import (
    MergePlan,
    MergeWindow,
    anchor_of,
    parse_ratio,
    window_sizes,
)
from layerfuse.passes.merge.tie import TieFeedForwardsPass, merged_window_weights
from layerfuse.passes.running import run_pass
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import ActivationTap, stream_rows

FEATURES = ("pre_activation", "hidden")
# Shrinkage toward the averaged weights tried by the refit, as multiples of mean(diag G).
REFIT_SHRINKAGE = (0.3, 1.0, 3.0, 10.0)


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
    calib: str = "fortunes"
    calib_tokens: int = 10240
    valid_tokens: int = 4096
    seq_len: int = 128
    batch_size: int = 8
    refit: bool = False
    provider: str = "auto"
    memory_budget_bytes: int = 2 * 1024**3


def score_candidate(model_path: Path, plan: MergePlan, scorer: CandidateScorer) -> float:
    model = load_model(model_path)
    run_pass(TieFeedForwardsPass(plan), model)
    return scorer(model)


def _candidate_windows(structure: ModelStructure, request: MergeRequest) -> list[list[list[int]]]:
    """Per window to place: the list of block runs it may cover."""
    num_blocks = len(structure.blocks)
    if request.ranges:
        for first, last in request.ranges:
            if not 0 <= first < last < num_blocks:
                raise PlanError(
                    f"window {first}-{last} does not fit a model of {num_blocks} blocks "
                    f"(0-{num_blocks - 1}, at least 2 per window)"
                )
        return [[list(range(first, last + 1))] for first, last in request.ranges]
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
    features = {i: getattr(structure.blocks[i].ff, request.features).name for i in involved}
    correlations: dict[tuple[int, int], np.ndarray] = {}
    groups = pair_groups(pairs, widths, request.memory_budget_bytes)
    for number, group in enumerate(groups, start=1):
        blocks = sorted({i for pair in group for i in pair})
        tap = ActivationTap(model_path, [features[i] for i in blocks], provider=request.provider)
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
        options = [blocks for blocks in all_options if not placed & set(blocks)]
        if not options:
            raise PlanError("the windows do not fit into the model without overlapping")
        if len(options) == 1:
            chosen.append(_window(options[0], request, alignments))
            continue
        scored = []
        for blocks in reporter.track(options, len(options), "scoring window positions"):
            window = _window(blocks, request, alignments)
            plan = MergePlan(**base_plan, windows=[*chosen, window])
            scored.append((score_candidate(model_path, plan, scorer), window))
        chosen.append(min(scored, key=lambda item: item[0])[1])
        selection_scores.append(
            [{"blocks": [w.blocks[0], w.blocks[-1]], "score": s} for s, w in scored]
        )
    return chosen, selection_scores


def plan_merge(
    model_path: str | os.PathLike, request: MergeRequest, reporter: Reporter = SILENT
) -> MergePlan:
    """Analyse the model at ``model_path`` and return a merge plan (nothing is written)."""
    model_path = Path(model_path)
    if request.features not in FEATURES:
        raise PlanError(f"unknown features '{request.features}' (choose {', '.join(FEATURES)})")
    model = load_model(model_path)
    structure = detect_structure(model)
    candidates = _candidate_windows(structure, request)
    base_plan = {
        "fingerprint": structure.fingerprint,
        "num_blocks": len(structure.blocks),
        "method": request.method,
        "anchor": request.anchor,
        "features": request.features,
    }
    # Validate method, anchor and every candidate's shapes before any expensive step.
    MergePlan(**base_plan, windows=[])
    for options in candidates:
        for blocks in options:
            window = MergeWindow(blocks, anchor_of(blocks, request.anchor))
            TieFeedForwardsPass(MergePlan(**base_plan, windows=[window])).requires(model)

    def batches(split: str, tokens: int) -> list[InputBatch]:
        return make_batches(
            model_path,
            request.calib,
            split,
            tokens=tokens,
            seq_len=request.seq_len,
            batch_size=request.batch_size,
        )

    calibration = (
        batches("calib", request.calib_tokens)
        if (request.method == "permute" or request.refit)
        else []
    )
    alignments = {}
    if request.method == "permute":
        alignments = _alignments(model_path, structure, candidates, calibration, request, reporter)
    scorer = None
    if request.refit or any(len(options) > 1 for options in candidates):
        valid = batches("valid", request.valid_tokens)
        scorer = CandidateScorer(model_path, valid, data=request.calib, provider=request.provider)
    chosen, selection_scores = _select_windows(
        model_path, base_plan, candidates, alignments, scorer, request, reporter
    )
    plan = MergePlan(**base_plan, windows=chosen)
    if calibration:
        plan.calibration = {"data": request.calib, "tokens": sum(b.rows for b in calibration)}
    if selection_scores:
        plan.selection = {
            "method": request.select,
            "metric": scorer.metric,
            "split": "valid",
            "candidates": selection_scores,
        }
    if request.refit:
        _refit_if_it_helps(model_path, plan, calibration, scorer, request, reporter)
    merged = load_model(model_path)
    before = weight_bytes(merged)
    run_pass(TieFeedForwardsPass(plan), merged)
    plan.bytes_removed = before - weight_bytes(merged)
    plan.parameters_removed = sum(
        (len(w.blocks) - 1) * structure.blocks[w.anchor].ff.parameter_count for w in plan.windows
    )
    return plan


@dataclass
class RefitSystem:
    """Normal equations of one window's down-projection refit, solvable for any shrinkage."""

    width: int
    has_bias: bool
    gram: np.ndarray
    cross: np.ndarray
    prior: np.ndarray

    def solve(self, shrinkage: float) -> dict[str, np.ndarray]:
        """``W = (G + lam I)^-1 (C + lam W_avg)``, ``lam = shrinkage * mean(diag G)``.

        Shrinking toward the averaged weights matters: an unregularized fit amplifies the
        very input shift it causes in the later blocks of the window (measured on MiniLM:
        19x the averaged error in the third block of a three-block window).
        """
        ridge = max(shrinkage, 1e-9) * np.trace(self.gram) / len(self.gram)
        identity = np.eye(len(self.gram))
        solution = np.linalg.solve(self.gram + ridge * identity, self.cross + ridge * self.prior)
        weights = {"down": solution[: self.width].astype(np.float32)}
        if self.has_bias:
            weights["down_bias"] = solution[self.width].astype(np.float32)
        return weights


def refit_systems(
    model_path: Path,
    plan: MergePlan,
    batches: list[InputBatch],
    *,
    provider: str = "auto",
    reporter: Reporter = SILENT,
) -> list[RefitSystem]:
    """Accumulate, batch by batch, the least-squares problem of each window's shared
    down-projection: inputs are what each tied FF reads in the merged model (upstream drift
    included), targets what the *original* FF of that block outputs on those inputs."""
    original = detect_structure(load_model(model_path))
    tied = load_model(model_path)
    run_pass(TieFeedForwardsPass(plan), tied)
    tied_structure = detect_structure(tied)
    inputs = {b: tied_structure.blocks[b].ff.input.name for w in plan.windows for b in w.blocks}
    tap = ActivationTap(
        tied, sorted(set(inputs.values())), provider=provider, external_data_dir=model_path.parent
    )
    systems, shared = [], []
    for window in plan.windows:
        feedforwards = [original.blocks[b].ff for b in window.blocks]
        if any(ff.neuron_parameters for ff in feedforwards):
            raise PlanError("refit is not supported for FFs with constants inside the activation")
        weights = merged_window_weights(feedforwards, window, None)
        has_bias = "down" in weights.biases
        prior = weights.matrices["down"].astype(np.float64)
        if has_bias:
            prior = np.vstack([prior, weights.biases["down"][None, :]])
        size = len(prior)
        systems.append(
            RefitSystem(
                weights.width, has_bias, np.zeros((size, size)), np.zeros_like(prior), prior
            )
        )
        shared.append(weights)
    originals = {b: read_ff_weights(original.blocks[b].ff) for w in plan.windows for b in w.blocks}
    for rows in stream_rows(
        tap, batches, total=len(batches), reporter=reporter, description="refitting"
    ):
        for window, system, weights in zip(plan.windows, systems, shared, strict=True):
            for block in window.blocks:
                x = rows[inputs[block]].astype(np.float64)
                hidden = hidden_activations(weights, x)
                if system.has_bias:
                    hidden = np.hstack([hidden, np.ones((len(hidden), 1))])
                system.gram += hidden.T @ hidden
                system.cross += hidden.T @ ff_forward(originals[block], x)
    return systems


def refit_down_projections(
    model_path: Path,
    plan: MergePlan,
    batches: list[InputBatch],
    *,
    shrinkage: float = 3.0,
    provider: str = "auto",
) -> dict[int, dict[str, np.ndarray]]:
    """Refitted down-projection weights per window index, for one shrinkage."""
    systems = refit_systems(model_path, plan, batches, provider=provider)
    return {index: system.solve(shrinkage) for index, system in enumerate(systems)}


def choose_shrinkage(
    model_path: Path,
    plan: MergePlan,
    systems: list[RefitSystem],
    scorer: CandidateScorer,
    reporter: Reporter = SILENT,
) -> dict:
    """Score plain averaging and every refit strength on validation data.

    Leaves ``plan.refit_weights`` at the best strength and returns the record stored as
    ``plan.refit``; whether to keep a refit that lost to averaging is the caller's choice.
    """
    plan.refit_weights = {}
    baseline = score_candidate(model_path, plan, scorer)
    trials = []
    for shrinkage in reporter.track(REFIT_SHRINKAGE, len(REFIT_SHRINKAGE), "refit shrinkage"):
        plan.refit_weights = {i: system.solve(shrinkage) for i, system in enumerate(systems)}
        trials.append((score_candidate(model_path, plan, scorer), shrinkage))
    best_score, best_shrinkage = min(trials)
    plan.refit_weights = {i: system.solve(best_shrinkage) for i, system in enumerate(systems)}
    return {
        "metric": scorer.metric,
        "before": baseline,
        "after": best_score,
        "shrinkage": best_shrinkage,
        "trials": [{"shrinkage": lam, "score": score} for score, lam in trials],
        "kept": best_score < baseline,
    }


def _refit_if_it_helps(
    model_path: Path,
    plan: MergePlan,
    batches: list[InputBatch],
    scorer: CandidateScorer,
    request: MergeRequest,
    reporter: Reporter,
) -> None:
    """Refit at the strength validation prefers, and keep it only if it beats averaging."""
    systems = refit_systems(model_path, plan, batches, provider=request.provider, reporter=reporter)
    record = choose_shrinkage(model_path, plan, systems, scorer, reporter)
    reporter.step(
        f"refit: validation {scorer.metric} {record['before']:.4g} -> {record['after']:.4g} at "
        f"shrinkage {record['shrinkage']:g} "
        f"({'kept' if record['kept'] else 'dropped: it did not help'})"
    )
    plan.refit = record
    if not record["kept"]:
        plan.refit_weights = {}


def apply_merge_plan(model_path: str | os.PathLike, plan: MergePlan) -> ir.Model:
    """Load the model and tie it according to ``plan`` (in memory; the caller saves)."""
    model = load_model(model_path)
    run_pass(TieFeedForwardsPass(plan), model)
    return model
