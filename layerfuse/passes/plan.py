"""What every plan shares: its JSON schema, atomic save/load, and the check that it fits.

A plan is the reviewable record of an analysis and the only input of a rewrite. Subclasses
(merge, prune, fuse) declare ``SCHEMA``, hold their own fields, and implement ``to_json``,
``from_json`` and ``rewrite_pass``; saving, loading, schema checks and the fingerprint check
live here once. A plan whose data does not fit JSON (refitted weights) writes a sidecar file
through ``save_sidecars``/``load_sidecars``.
"""

from __future__ import annotations

__all__ = ["HoldsModel", "Plan", "apply_plan", "read_sidecar", "write_sidecar"]

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, Self, TypeVar

import numpy as np
import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.files import write_json_atomic
from layerfuse.model.fingerprint import fingerprint, matches
from layerfuse.model.io import load_model
from layerfuse.passes.detect import ModelStructure, detect_structure

if TYPE_CHECKING:
    from layerfuse.passes.base import PlanPass


class HoldsModel(Protocol):
    """Anything that wraps an onnx_ir model as ``.ir`` (``layerfuse.Model`` does)."""

    ir: ir.Model


Target = TypeVar("Target", ir.Model, HoldsModel)


@dataclass
class Plan:
    """The model a plan was made for: its structural fingerprint and number of blocks."""

    SCHEMA: ClassVar[str]
    # Older schemas this class still reads (their files must keep applying).
    READS: ClassVar[tuple[str, ...]] = ()

    fingerprint: str
    num_blocks: int

    def to_json(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: dict) -> Self:
        raise NotImplementedError

    def rewrite_pass(self) -> PlanPass:
        """The in-place pass that applies this plan."""
        raise NotImplementedError

    def apply(self, model: Target) -> Target:
        """Rewrite ``model`` in place and return it, like an onnx_ir in-place pass.

        Example::

            plan = MergePlan.load("merge.plan.json")
            merged = plan.apply(layerfuse.load("model.onnx"))
        """
        self.rewrite_pass()(model if isinstance(model, ir.Model) else model.ir)
        return model

    def save_sidecars(self, path: Path, data: dict) -> None:
        """Write data too large for JSON beside ``path`` and record it in ``data``."""

    def load_sidecars(self, path: Path, data: dict) -> None:
        """Read what :meth:`save_sidecars` wrote."""

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        data = {"schema": self.SCHEMA, **self.to_json()}
        path.parent.mkdir(parents=True, exist_ok=True)  # sidecars are written before the JSON
        self.save_sidecars(path, data)
        return write_json_atomic(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{path}: cannot read the plan ({exc})") from None
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema not in (cls.SCHEMA, *cls.READS):
            raise PlanError(f"{path}: not a {cls.SCHEMA} plan (schema {schema!r})")
        try:
            plan = cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{path}: malformed {cls.SCHEMA} plan ({exc!r})") from None
        plan.load_sidecars(path, data)
        return plan

    def check_fits(self, model: ir.Model) -> ModelStructure:
        """The model's structure, after checking the plan was made for this model.

        The fingerprint covers the weights and the ops that read them, so a plan made on one
        signature of a model (plain, ``--kv-cache``) fits the others. A plan holding a
        fingerprint of the first scheme is checked by that scheme, then takes today's, so the
        provenance recorded in what it writes is of one scheme.
        """
        actual = fingerprint(model)
        if actual != self.fingerprint:
            if not matches(model, self.fingerprint):
                raise PlanError(
                    f"the plan was made for a model with fingerprint {self.fingerprint}, "
                    f"this one has {actual} (other weights or other ops reading them)"
                )
            self.fingerprint = actual
        structure = detect_structure(model)
        if len(structure.blocks) != self.num_blocks:
            raise PlanError(
                f"the plan expects {self.num_blocks} blocks, found {len(structure.blocks)}"
            )
        return structure


def write_sidecar(plan_path: Path, arrays: dict[str, np.ndarray]) -> dict:
    """Write ``arrays`` beside the plan at ``plan_path`` (``.npz``, atomically); the record
    (file name, hash) the plan's JSON keeps to find and check them."""
    sidecar = plan_path.with_suffix(".npz")
    tmp = sidecar.with_name(f".{sidecar.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, sidecar)
    return {"file": sidecar.name, "sha256": hashlib.sha256(sidecar.read_bytes()).hexdigest()}


def read_sidecar(plan_path: Path, record: dict, what: str) -> dict[str, np.ndarray]:
    """The arrays :func:`write_sidecar` wrote, checked against the plan's hash."""
    sidecar = plan_path.parent / record["file"]
    if not sidecar.is_file():
        raise PlanError(f"{plan_path}: {what} {sidecar.name} are missing")
    if hashlib.sha256(sidecar.read_bytes()).hexdigest() != record.get("sha256"):
        raise PlanError(f"{sidecar}: {what} do not match the plan's hash")
    with np.load(sidecar) as arrays:
        return {key: arrays[key] for key in arrays.files}


def apply_plan(model_path: str | os.PathLike, plan: Plan) -> ir.Model:
    """Load the model at ``model_path`` and rewrite it in memory by ``plan``."""
    return plan.apply(load_model(model_path))
