"""The user journey on every decoder family of the matrix, one test per stage.

What the operation matrix (``tests/test_families.py``) cannot catch is what breaks between
commands: the task an export infers, whether text windows start the way the tokenizer says,
whether ``generate`` finds and carries the cache of the ``--kv-cache`` export, and whether a
plan made on the plain export applies to the cache export of the same model. Each family's
outcome per stage is written beside the operation matrix's for ``docs/models.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import transformers

from layerfuse.data.batches import make_batches
from layerfuse.errors import LayerfuseError
from layerfuse.files import write_json_atomic
from layerfuse.generate import Decoder, generate_ids
from layerfuse.model.io import save_model
from layerfuse.model.manifest import carry_manifest, require_manifest
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.runtime.session import create_session
from tests import kv_models, tiny_models

ENCODERS = ("bert", "roberta", "xlm_roberta", "distilbert", "vit", "deit")
DECODERS = tuple(f for f in tiny_models.FAMILIES if f not in ENCODERS)
STAGES = ("export --kv-cache", "bos", "generate (cache)", "plan on both exports")
PROMPT = [5, 9, 14, 3, 22, 7]
NEW_TOKENS = 8


class JourneyExports:
    """Each decoder family's Hugging Face folder, plain export and ``--kv-cache`` export."""

    def __init__(self, tiny, root: Path) -> None:
        self.tiny, self.root = tiny, root
        self._done: dict[tuple[str, bool], Path] = {}

    def export(self, family: str, kv_cache: bool) -> Path:
        key = (family, kv_cache)
        if key not in self._done:
            from layerfuse.export.onnx_export import export_model
            from layerfuse.export.sources import load_source

            folder = self.tiny.folder(family)
            source = load_source(str(folder))
            source.tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
            out = self.root / family / ("kv" if kv_cache else "plain")
            self._done[key] = export_model(source, out, kv_cache=kv_cache).model_path
        return self._done[key]


@pytest.fixture(scope="module")
def journey(tiny, tmp_path_factory) -> JourneyExports:
    return JourneyExports(tiny, tmp_path_factory.mktemp("journey"))


@pytest.fixture(scope="module")
def stages():
    """family -> stage -> outcome; merged into the family matrix file when asked to."""
    table: dict[str, dict[str, dict]] = {family: {} for family in DECODERS}
    yield table
    target = os.environ.get("LAYERFUSE_JOURNEY_MATRIX")
    if target:
        write_json_atomic(target, {"stages": list(STAGES), "families": table})


def _kv_export(journey, stages, family) -> Path:
    """The cache export, or the test ends here with the one-line refusal recorded."""
    try:
        return journey.export(family, kv_cache=True)
    except LayerfuseError as error:
        stages[family]["export --kv-cache"] = {"status": "refused", "detail": str(error)}
        assert "\n" not in str(error)
        pytest.skip(f"{family}: --kv-cache refused: {error}")


@pytest.mark.parametrize("family", DECODERS)
def test_both_exports_are_causal_lms(journey, stages, family):
    plain = require_manifest(journey.export(family, kv_cache=False))
    assert plain.task == "causal-lm"
    cached = require_manifest(_kv_export(journey, stages, family))
    assert cached.task == "causal-lm" and cached.generation
    stages[family]["export --kv-cache"] = {"status": "works", "detail": "task causal-lm"}


@pytest.mark.parametrize("family", DECODERS)
def test_windows_start_as_the_manifest_says(journey, stages, family):
    path = journey.export(family, kv_cache=False)
    manifest = require_manifest(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent / manifest.tokenizer)
    adds = tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    assert manifest.bos == adds
    batch = make_batches(path, "fortunes", "valid", tokens=64, seq_len=16, batch_size=4)[0]
    starts = batch.feeds[manifest.inputs[0]][:, 0]
    assert bool(np.all(starts == tokenizer.bos_token_id)) == adds
    stages[family]["bos"] = {"status": "works", "detail": f"bos {str(adds).lower()}"}


@pytest.mark.parametrize("family", DECODERS)
def test_generation_with_the_cache_equals_torch(journey, stages, family):
    path = _kv_export(journey, stages, family)
    model = transformers.AutoModelForCausalLM.from_pretrained(journey.tiny.folder(family)).eval()
    expected = kv_models.torch_greedy(model, [PROMPT], NEW_TOKENS)[0]
    decoder = Decoder(path, provider="cpu")
    generated = generate_ids(
        decoder, [PROMPT], max_new_tokens=NEW_TOKENS, suppress_eos=True
    ).tokens[0]
    assert generated == expected
    stages[family]["generate (cache)"] = {
        "status": "works",
        "detail": f"{len(decoder.entries)} cache tensors, {NEW_TOKENS} tokens = torch",
    }


def _prefill_logits(path: Path) -> np.ndarray:
    from layerfuse.runtime.calibration import adapt_feeds

    session = create_session(path, provider="cpu")
    ids = np.array([PROMPT], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return session.run(None, adapt_feeds(session, feeds))[0]


@pytest.mark.parametrize("family", DECODERS)
def test_a_plan_made_on_the_plain_export_applies_to_the_cache_export(
    journey, stages, family, tmp_path
):
    plain = journey.export(family, kv_cache=False)
    cached = _kv_export(journey, stages, family)
    plan = plan_merge(plain, MergeRequest(ranges=[(0, 1)], method="vanilla"))
    logits = []
    for name, source in (("plain", plain), ("kv", cached)):
        target = tmp_path / name / "model.onnx"
        save_model(apply_plan(source, plan), target)
        carry_manifest(source, target)
        logits.append(_prefill_logits(target))
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4)
    stages[family]["plan on both exports"] = {"status": "works", "detail": "same logits"}
