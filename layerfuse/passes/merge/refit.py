"""Least-squares refit of each window's shared down-projection (training-free, beyond the paper).

Averaging makes every FF of a window compute something between its own function and its
neighbours'. The refit keeps the shared gate/up weights and solves for the one down-projection
that makes the tied FFs reproduce, on the inputs they actually see in the merged model
(upstream drift included), what the *original* FFs would output there. The normal equations
are accumulated batch by batch, then solved with shrinkage toward the averaged weights at a
few strengths; validation picks one, and the merge planner keeps the refit only if it beats
plain averaging.
"""

from __future__ import annotations

__all__ = [
    "REFIT_SHRINKAGE",
    "RefitSystem",
    "choose_shrinkage",
    "refit_down_projections",
    "refit_if_it_helps",
    "refit_systems",
]

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerfuse.data.batches import InputBatch
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.ff_weights import (
    ff_forward,
    hidden_activations,
    read_ff_weights,
    require_modelled,
)
from layerfuse.passes.merge.plan import MergePlan
from layerfuse.passes.merge.tie import merged_window_weights
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import ActivationTap, stream_rows

# Shrinkage toward the averaged weights tried by the refit, as multiples of mean(diag G).
REFIT_SHRINKAGE = (0.3, 1.0, 3.0, 10.0)


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
    down-projection: inputs are what each tied FF reads in the merged model, targets what
    the *original* FF of that block outputs on those inputs."""
    original = detect_structure(load_model(model_path))
    tied = apply_plan(model_path, plan)
    tied_structure = detect_structure(tied)
    inputs = {b: tied_structure.blocks[b].ff.input.name for w in plan.windows for b in w.blocks}
    tap = ActivationTap(
        tied,
        sorted(set(inputs.values())),
        provider=provider,
        external_data_dir=model_path.parent,
        model_outputs=False,
    )
    systems, shared = [], []
    for window in plan.windows:
        feedforwards = [original.blocks[b].ff for b in window.blocks]
        require_modelled(feedforwards, "refit")
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
    baseline = scorer(apply_plan(model_path, plan))
    trials = []
    for shrinkage in reporter.track(REFIT_SHRINKAGE, len(REFIT_SHRINKAGE), "refit shrinkage"):
        plan.refit_weights = {i: system.solve(shrinkage) for i, system in enumerate(systems)}
        trials.append((scorer(apply_plan(model_path, plan)), shrinkage))
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


def refit_if_it_helps(
    model_path: Path,
    plan: MergePlan,
    batches: list[InputBatch],
    scorer: CandidateScorer,
    *,
    provider: str = "auto",
    reporter: Reporter = SILENT,
) -> None:
    """Refit at the strength validation prefers, and keep it only if it beats averaging."""
    systems = refit_systems(model_path, plan, batches, provider=provider, reporter=reporter)
    record = choose_shrinkage(model_path, plan, systems, scorer, reporter)
    reporter.step(
        f"refit: validation {scorer.metric} {record['before']:.4g} -> {record['after']:.4g} at "
        f"shrinkage {record['shrinkage']:g} "
        f"({'kept' if record['kept'] else 'dropped: it did not help'})"
    )
    plan.refit = record
    if not record["kept"]:
        plan.refit_weights = {}
