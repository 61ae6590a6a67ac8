"""Olive passes running layerfuse's merge, prune, FFN Fusion and KV sharing.

Microsoft Olive (``pip install layerfuse[olive]``, olive-ai 0.13) chains passes over model
handlers; :class:`LayerfuseMerge`, :class:`LayerfusePrune`, :class:`LayerfuseFuse` and
:class:`LayerfuseShareKV` are Olive passes taking and returning ONNX models, so they sit
next to Olive's own ONNX passes in one workflow. Each loads its input with
:func:`layerfuse.load`, plans with the same planner ``layerfuse.plan_*`` runs, applies the plan
and saves the result (with the folder's ``layerfuse.json`` and tokenizer) into Olive's output
path, the plan JSON beside it (``merge.plan.json``, ...).

A pass's options are its request dataclass's fields (:class:`~layerfuse.passes.merge.
MergeRequest`, ...), generated from the dataclass, so they never drift from the API; ``data``
takes the :class:`~layerfuse.passes.planner.DataSettings` fields to change (``{"provider":
"cpu", "calib_tokens": 2048}``), the others keep the request's defaults.

Olive looks passes up in a package config, so run workflows with :func:`run` (Olive's own
config plus these passes) or give ``olive run`` the file :func:`write_package_config` writes.
The manifest and tokenizer travel through Olive's own passes as the model's
``additional_files``: declare them on the input model with :func:`input_model`.

Example::

    from layerfuse.integrations import olive

    olive.run({
        "input_model": olive.input_model("smollm2/model.onnx"),
        "passes": {
            "merge": {"type": "LayerfuseMerge", "ratio": "1/3", "method": "permute"},
            "peephole": {"type": "OnnxPeepholeOptimizer"},
        },
        "output_dir": "olive-out",
    })
"""

from __future__ import annotations

__all__ = [
    "LayerfuseFuse",
    "LayerfuseMerge",
    "LayerfusePrune",
    "LayerfuseShareKV",
    "input_model",
    "package_config",
    "request_config",
    "run",
    "write_package_config",
]

import dataclasses
import json
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

import layerfuse.api as api
from layerfuse.errors import LayerfuseError
from layerfuse.files import write_json_atomic
from layerfuse.model.publish import model_files
from layerfuse.passes.fuse import FuseRequest
from layerfuse.passes.merge import MergeRequest
from layerfuse.passes.plan import Plan
from layerfuse.passes.prune import PruneRequest
from layerfuse.passes.share_kv import ShareKVRequest


def _nested(kind: type) -> dict[str, type]:
    """The request's dataclass-typed fields (``data``), by name."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind) if _is_dataclass(hints[f.name])}


def _is_dataclass(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def request_config(kind: type) -> dict[str, PassConfigParam]:
    """Olive config parameters for a request dataclass: one per field, same type and default.

    A dataclass-typed field (``data``) becomes a dict of the fields to change in it.
    """
    hints, defaults, nested = typing.get_type_hints(kind), kind(), _nested(kind)
    params = {}
    for spec in dataclasses.fields(kind):
        default = getattr(defaults, spec.name)
        if spec.name in nested:
            names = ", ".join(f.name for f in dataclasses.fields(nested[spec.name]))
            params[spec.name] = PassConfigParam(
                type_=dict[str, Any] | None,
                default_value=None,
                description=f"{nested[spec.name].__name__} fields to change ({names}); "
                f"defaults: {dataclasses.asdict(default)}",
            )
            continue
        help_text = spec.metadata.get("help") or f"{kind.__name__}.{spec.name}"
        params[spec.name] = PassConfigParam(
            type_=hints[spec.name], default_value=default, description=help_text
        )
    return params


def build_request(kind: type, values: dict[str, Any]) -> Any:
    """``kind`` from Olive's config values; nested settings changed field by field."""
    defaults, fields = kind(), {}
    for spec in dataclasses.fields(kind):
        fields[spec.name] = values.get(spec.name, getattr(defaults, spec.name))
    for name, nested in _nested(kind).items():
        changes = fields[name] if isinstance(fields[name], dict) else None
        if changes is None:
            fields[name] = getattr(defaults, name) if fields[name] is None else fields[name]
            continue
        known = {f.name for f in dataclasses.fields(nested)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise LayerfuseError(
                f"{kind.__name__}.{name} has no field {', '.join(unknown)} "
                f"({', '.join(sorted(known))})"
            )
        fields[name] = dataclasses.replace(getattr(defaults, name), **changes)
    return kind(**fields)


def _beside(model_path: Path) -> list[str]:
    """Files and folders beside ``model_path`` that are no graph's (manifest, tokenizer,
    plans): Olive copies a model's ``additional_files`` along to every later pass's output."""
    folder = model_path.parent
    graphs = {path.resolve() for onnx in folder.glob("*.onnx") for path in model_files(onnx)}
    return sorted(
        str(path)
        for path in folder.iterdir()
        if path.resolve() not in graphs and not path.name.startswith(".")
    )


class _LayerfusePass(Pass):
    """An Olive pass that plans one layerfuse rewrite on its input and applies it."""

    request: ClassVar[type]
    kind: ClassVar[str]
    # The layerfuse.api planner (a staticmethod: Olive instantiates the pass).
    planner: ClassVar[Callable[[api.Model, Any], Plan]]

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return request_config(cls.request)

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        source = Path(model.model_path)
        target = Path(resolve_onnx_path(output_model_path, source.name))
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(self.request)}
        loaded = api.load(source)
        plan = self.planner(loaded, build_request(self.request, values))
        plan.apply(loaded).save(target)
        plan.save(target.parent / f"{self.kind}.plan.json")
        attributes = dict(model.model_attributes or {})
        attributes["additional_files"] = _beside(target)
        return ONNXModelHandler(
            model_path=str(target.parent),
            onnx_file_name=target.name,
            inference_settings=model.inference_settings,
            use_ort_extensions=model.use_ort_extensions,
            model_attributes=attributes,
        )


class LayerfuseMerge(_LayerfusePass):
    """Align and tie FF sublayers (:func:`layerfuse.plan_merge`; ``MergeRequest`` fields)."""

    request, kind, planner = MergeRequest, "merge", staticmethod(api.plan_merge)


class LayerfusePrune(_LayerfusePass):
    """Remove blocks, FFs or attention (:func:`layerfuse.plan_prune`; ``PruneRequest``)."""

    request, kind, planner = PruneRequest, "prune", staticmethod(api.plan_prune)


class LayerfuseFuse(_LayerfusePass):
    """FFN Fusion (:func:`layerfuse.plan_fuse`; ``FuseRequest`` fields)."""

    request, kind, planner = FuseRequest, "fuse", staticmethod(api.plan_fuse)


class LayerfuseShareKV(_LayerfusePass):
    """Cross-layer KV sharing (:func:`layerfuse.plan_share_kv`; ``ShareKVRequest``)."""

    request, kind, planner = ShareKVRequest, "share_kv", staticmethod(api.plan_share_kv)


PASSES = (LayerfuseMerge, LayerfusePrune, LayerfuseFuse, LayerfuseShareKV)


def package_config() -> dict:
    """Olive's own package config (its passes) with layerfuse's passes added."""
    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    for cls in PASSES:
        config["passes"][cls.__name__] = {
            "module_path": f"{cls.__module__}.{cls.__name__}",
            "supported_providers": ["*"],
            "supported_accelerators": ["*"],
            "supported_precisions": ["*"],
        }
    return config


def write_package_config(path: str | os.PathLike) -> Path:
    """Write :func:`package_config` for ``olive run --config ... --package-config PATH``."""
    return write_json_atomic(Path(path), package_config())


def input_model(path: str | os.PathLike, **config: Any) -> dict:
    """Olive's ``input_model`` entry for a layerfuse model: the ONNX file, with the files
    beside it (manifest, tokenizer) as ``additional_files`` so that Olive's own passes carry
    them to their outputs too. ``config``: more ``ONNXModel`` settings."""
    model_path = Path(path).resolve()
    attributes = dict(config.pop("model_attributes", None) or {})
    attributes["additional_files"] = [*attributes.get("additional_files", []), *_beside(model_path)]
    return {
        "type": "ONNXModel",
        "model_path": str(model_path),
        "model_attributes": attributes,
        **config,
    }


def run(run_config: dict | str | os.PathLike, **options: Any) -> Any:
    """``olive.workflows.run`` with layerfuse's passes known; returns Olive's WorkflowOutput."""
    from olive.workflows import run as olive_run

    return olive_run(run_config, package_config=package_config(), **options)
