"""A finalist's folder: its plans, and the compressed model recovery starts from."""

from __future__ import annotations

__all__ = ["apply_plans", "plan_file", "prepare_finalist", "save_plans", "screened_plans"]

from pathlib import Path

import onnx_ir as ir

from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.optimize.candidates import Candidate
from layerfuse.passes.registry import load_plan


def apply_plans(model_path: Path, plans: list) -> ir.Model:
    """The model at ``model_path`` rewritten by each saved plan in turn (a hybrid's prune,
    then its merge planned on the pruned model)."""
    model = load_model(model_path)
    for path in plans:
        load_plan(path).apply(model)
    return model


def plan_file(folder: Path, index: int) -> Path:
    """Where the ``index``-th plan of a chain is kept: plan.json, then plan-2.json, ..."""
    return folder / ("plan.json" if index == 0 else f"plan-{index + 1}.json")


def save_plans(sources: list, folder: Path) -> list[Path]:
    """Each saved plan copied into ``folder`` in chain order (:func:`plan_file`)."""
    return [load_plan(source).save(plan_file(folder, i)) for i, source in enumerate(sources)]


def screened_plans(candidate: Candidate) -> list[str]:
    """The candidate's saved plans in the order they apply."""
    screen = candidate.results["screen"]
    return screen.get("plans", [screen["plan"]])


def prepare_finalist(model: Path, candidate: Candidate, folder: Path) -> tuple[Path, Path | None]:
    """``folder/plan.json`` (and ``plan-2.json``... for a chain) and
    ``folder/compressed/model.onnx`` (the plans applied, with the original's manifest and
    tokenizer beside it). The plan recovery reads, or None for a chain: its later plans fit
    the model the earlier ones made, not the original."""
    sources = screened_plans(candidate)
    saved = save_plans(sources, folder)
    compressed = folder / "compressed" / "model.onnx"
    save_model(apply_plans(model, saved), compressed)
    carry_manifest(model, compressed)
    return compressed, saved[0] if len(saved) == 1 else None
