"""The family matrix: every mainstream transformer family, detected and rewritten by dataflow.

Each family is a tiny random-weight model from its transformers config (:mod:`tests.tiny_models`),
exported once with the default exporter. For each one: detection finds the FF kind, the norm
position and the residual wiring torch has; every operation (merge, prune a block / an FF /
an attention sublayer, fuse) either computes what the same surgery computes in torch
(:mod:`tests.family_references`) or is refused in one line naming the block and the reason.

Outcomes are written to the JSON file named by ``LAYERFUSE_FAMILY_MATRIX`` when it is set;
``benchmarks/family_matrix.py`` renders that into ``docs/models.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import transformers

from layerfuse.errors import PlanError
from layerfuse.files import write_json_atomic
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.runtime.session import session_for_ir
from tests import family_references, tiny_models

FAMILIES = tiny_models.FAMILIES
OPERATIONS = ("merge", "prune block", "prune ff", "prune attention", "fuse")
PARALLEL = ("phi", "gpt_neox", "falcon", "falcon_new", "gptj")
# family -> (FF kind, FF norm position, attention norm position)
EXPECTED = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "phi3"), ("swiglu", "pre", "pre")),
    "gemma": ("geglu", "pre", "pre"),
    "gemma2": ("geglu", "sandwich", "sandwich"),
    "gemma3": ("geglu", "sandwich", "sandwich"),
    "olmo2": ("swiglu", "output", "output"),
    "phi": ("gelu_tanh", "pre", "pre"),
    "gpt2": ("gelu_tanh", "pre", "pre"),
    "gptj": ("gelu_tanh", "pre", "pre"),
    **dict.fromkeys(("gpt_neox", "gpt_neox_seq", "falcon", "falcon_new"), ("gelu", "pre", "pre")),
    "opt": ("relu", "pre", "pre"),
    "opt_postnorm": ("relu", "post", "post"),
    **dict.fromkeys(("bert", "roberta", "xlm_roberta", "distilbert"), ("gelu", "post", "post")),
    **dict.fromkeys(("vit", "deit"), ("gelu", "pre", "pre")),
}
_POST_NORM = "is post-norm"
_OUTPUT_NORM = "normalized on its own before the residual Add"
# (family, operation) -> what its one-line refusal must say; every other pair must work.
REFUSED = {
    **{(f, "fuse"): _POST_NORM for f in ("bert", "roberta", "xlm_roberta", "distilbert")},
    ("opt_postnorm", "fuse"): _POST_NORM,
    **{(f, "fuse"): _OUTPUT_NORM for f in ("gemma2", "gemma3", "olmo2")},
}
RANDOM = DataSettings(data="random", calib_tokens=64, valid_tokens=64, seq_len=16, batch_size=4)
FUSE = {"drop": [1, 2], "runs": [(1, 2)]}
HEAD_KEEPS_ATTENTION = "fuse, run head keeps attention"
TOLERANCE = 1e-4
_GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


class FamilyExports:
    """Each family exported once per session: the suite's four originals through ``tiny``.

    transformers 5 ignores ``tokenizer_class`` for some model types (qwen2) and builds their
    own tokenizer from the vocabulary, which maps every text of the word-level test tokenizer
    to one token; the saved tokenizer is loaded back as it was written.
    """

    def __init__(self, tiny) -> None:
        self.tiny = tiny
        self._done: dict[str, Path] = {}

    def model(self, family: str) -> Path:
        if family in ("llama", "gpt2", "bert", "vit"):
            return self.tiny.model(family)
        if family not in self._done:
            from layerfuse.export.onnx_export import export_model
            from layerfuse.export.sources import load_source

            folder = self.tiny.folder(family)
            source = load_source(str(folder))
            if source.tokenizer is not None and (
                type(source.tokenizer).__name__ not in _GENERIC_TOKENIZERS
            ):
                source.tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
            out = self.tiny.root / "onnx" / f"{family}-dynamo"
            self._done[family] = export_model(source, out).model_path
        return self._done[family]


@pytest.fixture(scope="session")
def exports(tiny) -> FamilyExports:
    return FamilyExports(tiny)


@pytest.fixture(scope="module")
def outcomes():
    """family -> column -> outcome; written for ``docs/models.md`` when asked to."""
    table: dict[str, dict[str, dict]] = {family: {} for family in FAMILIES}
    yield table
    target = os.environ.get("LAYERFUSE_FAMILY_MATRIX")
    if target:
        write_json_atomic(target, {"operations": list(OPERATIONS), "families": table})


def _structure_summary(structure) -> str:
    block = structure.blocks[0]
    wiring = block.ff_wiring
    parts = [block.ff.kind, f"{wiring.norm_position}-norm"]
    if wiring.parallel:
        parts.append("parallel")
    if block.ff.up.columns is not None:
        parts.append("fused gate/up")
    return ", ".join(parts)


@pytest.mark.parametrize("family", FAMILIES)
def test_detection_finds_what_torch_has(exports, outcomes, family):
    structure = detect_structure(load_model(exports.model(family)))
    kind, ff_norm, attention_norm = EXPECTED[family]
    model = tiny_models.make_model(family)
    layers_path = family_references.SUBLAYERS[family][0]
    layers = family_references.module(model, layers_path)
    assert len(structure.blocks) == tiny_models.LAYERS
    for block, layer in zip(structure.blocks, layers, strict=True):
        names = family_references.FF_LINEARS[family]
        linears = [family_references.module(layer, name) for name in names]
        assert block.ff.parameter_count == sum(p.numel() for m in linears for p in m.parameters())
        assert block.ff.kind == kind
        assert block.attention is not None and block.attention_wiring is not None
        for wiring, position in (
            (block.ff_wiring, ff_norm),
            (block.attention_wiring, attention_norm),
        ):
            assert wiring.norm_position == position, wiring.notes
            assert wiring.residual is not None
            assert wiring.parallel == (family in PARALLEL)
        if family in PARALLEL:
            assert block.ff_wiring.residual.node is block.attention_wiring.residual.node
        else:
            assert block.stream_out is not None and block.stream_in is not None
    outcomes[family]["inspect"] = {"status": "works", "detail": _structure_summary(structure)}


def _plan(path: Path, operation: str):
    if operation == "merge":
        return plan_merge(path, MergeRequest(ranges=[(0, 1)], method="vanilla"))
    if operation.startswith("prune"):
        target = operation.split()[1]
        return plan_prune(path, PruneRequest(target=target, count=1, data=RANDOM))
    structure = detect_structure(load_model(path))
    return FusePlan(structure.fingerprint, len(structure.blocks), FUSE["drop"], FUSE["runs"])


def _surgery(operation: str, plan) -> dict:
    """What the plan does, as :func:`tests.family_references.run` takes it."""
    if operation == "merge":
        return {"operation": "merge", "blocks": plan.windows[0].blocks}
    if operation.startswith("prune"):
        return {"operation": "prune", "target": plan.target, "blocks": plan.blocks}
    return {"operation": "fuse", **FUSE}


def _max_diff(actual: np.ndarray, expected: np.ndarray, mask) -> float:
    difference = np.abs(actual.astype(np.float64) - expected)
    return float(difference.max() if mask is None else difference[mask].max())


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_operation_equals_torch_or_is_refused(exports, outcomes, family, operation):
    path = exports.model(family)
    refusal = REFUSED.get((family, operation))
    try:
        plan = _plan(path, operation)
        model = apply_plan(path, plan)
    except PlanError as error:
        message = str(error)
        outcomes[family][operation] = {"status": "refused", "detail": message}
        assert refusal is not None, message
        assert refusal in message and message.startswith("block ") and "\n" not in message
        return
    assert refusal is None, f"{family} {operation} was expected to be refused"
    _check_against_torch(
        family, path, model, _surgery(operation, plan), outcomes[family], operation
    )


def _check_against_torch(family: str, path: Path, model, how: dict, record: dict, key: str):
    """The rewritten graph equals torch with the same surgery (recorded under ``key`` either
    way), and the surgery changes the output, so that the check could fail."""
    inputs, mask = family_references.feeds(family)
    actual = session_for_ir(model, path.parent, provider="cpu").run(None, inputs)[0]
    expected = family_references.run(family, inputs, **how)
    diff = _max_diff(actual, expected, mask)
    status = "works" if diff < TOLERANCE else "wrong"
    record[key] = {"status": status, "detail": f"max |ORT - torch| {diff:.1e}"}
    assert diff < TOLERANCE
    assert _max_diff(family_references.original(family), expected, mask) > 1e-3


@pytest.mark.parametrize("family", PARALLEL)
def test_parallel_run_head_keeps_its_attention_beside_the_fused_ffn(exports, outcomes, family):
    """Fusing blocks 1-2 with only block 2's attention removed: ``x + attn_1(ln(x)) +
    FFN_1(ln(x)) + FFN_2(ln(x))``, which is torch's layers 1-2 reading the same input."""
    path = exports.model(family)
    structure = detect_structure(load_model(path))
    plan = FusePlan(structure.fingerprint, len(structure.blocks), [2], [(1, 2)])
    how = {"operation": "fuse", "drop": [2], "runs": [(1, 2)]}
    model = apply_plan(path, plan)
    _check_against_torch(family, path, model, how, outcomes[family], HEAD_KEEPS_ATTENTION)
