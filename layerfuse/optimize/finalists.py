"""A finalist's folder: its plan, and the compressed model recovery starts from."""

from __future__ import annotations

__all__ = ["load_plan", "prepare_finalist"]

import json
from pathlib import Path

from layerfuse.errors import PlanError
from layerfuse.model.io import save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.optimize.candidates import Candidate
from layerfuse.passes.plan import Plan, apply_plan
from layerfuse.passes.registry import plan_class_for


def load_plan(path: str | Path) -> Plan:
    """A saved plan of any kind, by the schema its file names."""
    schema = json.loads(Path(path).read_text()).get("schema")
    plan_class = plan_class_for(schema)
    if plan_class is None:
        raise PlanError(f"{path}: not a plan layerfuse knows (schema {schema!r})")
    return plan_class.load(path)


def prepare_finalist(model: Path, candidate: Candidate, folder: Path) -> tuple[Path, Path]:
    """``folder/plan.json`` and ``folder/compressed/model.onnx`` (the plan applied, with the
    original's manifest and tokenizer beside it)."""
    plan = load_plan(candidate.results["screen"]["plan"])
    plan_path = plan.save(folder / "plan.json")
    compressed = folder / "compressed" / "model.onnx"
    save_model(apply_plan(model, plan), compressed)
    carry_manifest(model, compressed)
    return compressed, plan_path
