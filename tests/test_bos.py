"""Text reaches a model the way it was trained to see it: packed windows start with BOS when
the tokenizer adds BOS (or the manifest says so), and encoders keep their [CLS] ... [SEP]."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from layerfuse.data.batches import fed_bos, make_batches
from layerfuse.data.tokens import adds_bos, packed_rows, sentence_batches
from layerfuse.errors import DataError
from layerfuse.model.manifest import Manifest
from tests import tiny_models

TEXTS = [f"the quick brown fox jumps over the lazy dog {word}" for word in tiny_models.WORDS]


def _tokenizer(template: str | None) -> transformers.PreTrainedTokenizerFast:
    """The tiny word-level tokenizer, plus [BOS]/[CLS]/[SEP] and an optional post-processor
    template that frames every text the way Llama's (``[BOS] $A``) or BERT's does."""
    specials = ["[PAD]", "[UNK]", "[EOS]", "[BOS]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(tiny_models.WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        used = [(token, vocab[token]) for token in specials if token in template]
        core.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        bos_token="[BOS]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def _model_folder(root: Path, template: str | None, task: str, bos: bool | None) -> Path:
    """A model folder as export writes it, minus the graph: batching reads only these."""
    root.mkdir(parents=True)
    _tokenizer(template).save_pretrained(root / "tokenizer")
    Manifest(
        source="tiny",
        origin="test",
        task=task,
        model_type="llama",
        inputs=["input_ids", "attention_mask"],
        output="logits",
        exporter="dynamo",
        opset=18,
        tokenizer="tokenizer",
        bos=bos,
    ).write(root)
    return root / "model.onnx"


def test_windows_start_with_bos_when_the_tokenizer_adds_it():
    tokenizer = _tokenizer("[BOS] $A")
    assert adds_bos(tokenizer)
    bos = tokenizer.bos_token_id
    rows = packed_rows(tokenizer, TEXTS, seq_len=16)
    assert rows.shape[1] == 16 and (rows[:, 0] == bos).all()
    # BOS is fed, never a target: next-token targets are positions 1.. and hold text only.
    assert not (rows[:, 1:] == bos).any()
    # Each window carries the next 15 tokens of the text stream, none skipped or repeated.
    stream = packed_rows(tokenizer, TEXTS, seq_len=15, bos=False).reshape(-1)
    assert rows[:, 1:].reshape(-1).tolist() == stream[: rows.shape[0] * 15].tolist()


def test_windows_have_no_bos_when_the_tokenizer_adds_none():
    tokenizer = _tokenizer(None)
    assert not adds_bos(tokenizer)
    rows = packed_rows(tokenizer, TEXTS, seq_len=16)
    assert not (rows == tokenizer.bos_token_id).any()
    assert not adds_bos(tiny_models.make_tokenizer())  # the suite's tokenizer has no BOS
    with pytest.raises(DataError, match="no BOS token"):
        packed_rows(tiny_models.make_tokenizer(), TEXTS, seq_len=16, bos=True)


@pytest.mark.parametrize(
    ("template", "recorded", "expected"),
    [
        ("[BOS] $A", None, True),  # a manifest from before the entry: the tokenizer decides
        (None, None, False),
        ("[BOS] $A", False, False),  # the manifest overrides the tokenizer, both ways
        (None, True, True),
    ],
)
def test_the_manifest_decides_and_old_manifests_ask_the_tokenizer(
    tmp_path, template, recorded, expected
):
    model = _model_folder(tmp_path / "m", template, "causal-lm", recorded)
    batches = make_batches(model, "fortunes", "test", tokens=256, seq_len=32, batch_size=4)
    ids = np.concatenate([batch.feeds["input_ids"] for batch in batches])
    assert ids.shape == (8, 32)
    assert (ids[:, 0] == 3).all() == expected and (ids[:, 1:] != 3).all()
    assert fed_bos(model, "fortunes") is expected
    # A caller reproducing an old measurement can still ask for either.
    forced = make_batches(model, "fortunes", "test", tokens=256, seq_len=32, bos=not expected)
    assert (forced[0].feeds["input_ids"][:, 0] == 3).all() == (not expected)


def test_a_manifest_bos_that_is_not_a_boolean_is_one_error(tmp_path):
    model = _model_folder(tmp_path / "m", None, "causal-lm", None)
    manifest = json.loads((tmp_path / "m" / "layerfuse.json").read_text())
    (tmp_path / "m" / "layerfuse.json").write_text(json.dumps({**manifest, "bos": "yes"}))
    with pytest.raises(DataError, match="'bos' is 'yes'; write true or false"):
        make_batches(model, "fortunes", "test", tokens=256, seq_len=32)


def test_encoders_keep_cls_and_sep_in_batches_and_topic_accuracy():
    tokenizer = _tokenizer("[CLS] $A [SEP]")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    texts = ["the quick brown fox", "hello world and the people of the world"]
    (batch,) = sentence_batches(tokenizer, texts, max_length=8, batch_size=2)
    lengths = batch.attention_mask.sum(axis=1)
    assert (batch.input_ids[:, 0] == cls).all()
    assert [row[length - 1] for row, length in zip(batch.input_ids, lengths, strict=True)] == [
        sep,
        sep,
    ]
    assert lengths.tolist() == [6, 8]  # truncation keeps [SEP] as the last real token


def test_encoder_calibration_batches_keep_cls_and_sep(tmp_path):
    model = _model_folder(tmp_path / "m", "[CLS] $A [SEP]", "encoder", None)
    batch = make_batches(model, "fortunes", "calib", tokens=64, seq_len=16, batch_size=4)[0]
    ids, mask = batch.feeds["input_ids"], batch.feeds["attention_mask"]
    assert (ids[:, 0] == 4).all()
    assert all(row[mask_row.sum() - 1] == 5 for row, mask_row in zip(ids, mask, strict=True))
    assert fed_bos(model, "fortunes") is None  # no packed windows: nothing to report
