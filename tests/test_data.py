"""Real text and labels: stable disjoint splits, balanced classes, batches of the right shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.data import corpus
from layerfuse.data.batches import make_batches, parse_spec, texts_for
from layerfuse.data.tokens import packed_batches
from layerfuse.errors import DataError
from layerfuse.runtime.evaluate import topic_accuracy
from layerfuse.runtime.session import create_session
from tests import tiny_models


def test_fortune_splits_are_disjoint_stable_and_sized():
    splits = {name: corpus.split_texts(name) for name in corpus.SPLITS}
    sets = {name: set(texts) for name, texts in splits.items()}
    for a, b in [("calib", "valid"), ("calib", "test"), ("valid", "test")]:
        assert not sets[a] & sets[b]
    assert all(not sets["train"] & sets[other] for other in ("calib", "valid", "test"))
    total = sum(len(texts) for texts in splits.values())
    assert total > 10_000
    assert 0.45 < (len(splits["calib"]) + len(splits["train"])) / total < 0.55
    # calib is the reserve calibration reads (a prefix in corpus order); train is the rest.
    assert sum(map(len, splits["calib"])) - len(splits["calib"][-1]) < corpus.CALIB_RESERVE_CHARS
    assert len(splits["train"]) > 4 * len(splits["calib"])
    assert corpus.split_texts("test")[:5] == splits["test"][:5]


def test_topic_dataset_is_balanced_and_labelled():
    for split in ("train", "test"):
        texts, labels, names = corpus.topic_dataset(split)
        assert names == list(corpus.TOPIC_CLASSES)
        assert np.bincount(labels).tolist() == [150] * len(names)
        assert len(set(texts)) == len(texts)
    train, _, _ = corpus.topic_dataset("train")
    test, _, _ = corpus.topic_dataset("test")
    assert not set(train) & set(test)


def test_packed_batches_have_no_padding_and_respect_the_budget():
    tokenizer = tiny_models.make_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog"] * 40
    batches = list(packed_batches(tokenizer, texts, seq_len=16, batch_size=4, max_tokens=160))
    assert sum(b.input_ids.shape[0] for b in batches) == 10
    assert all(b.input_ids.shape[1] == 16 and b.attention_mask.all() for b in batches)


def test_text_file_spec_and_bad_specs(tiny, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"paragraph {i} of the world and the people" for i in range(80)))
    batches = make_batches(tiny.model("llama"), str(text), "calib", tokens=64, seq_len=16)
    assert batches and batches[0].feeds["input_ids"].shape[1] == 16
    with pytest.raises(DataError, match="does not exist"):
        parse_spec(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown data"):
        parse_spec("wikipedia")


def test_jsonl_texts_split_into_four_disjoint_parts(tmp_path):
    texts = [f"entry {i} of the training text" for i in range(400)]
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n\n")
    spec = parse_spec(str(path))
    splits = {name: texts_for(spec, name) for name in ("calib", "train", "valid", "test")}
    assert sorted(t for part in splits.values() for t in part) == sorted(texts)
    # calib 1/8, train 3/8, valid and test 1/4 each, by hash of the text.
    shares = {name: len(part) / len(texts) for name, part in splits.items()}
    assert abs(shares["train"] - 3 / 8) < 0.07 and abs(shares["calib"] - 1 / 8) < 0.05
    assert abs(shares["valid"] - 1 / 4) < 0.07 and abs(shares["test"] - 1 / 4) < 0.07
    path.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"texts.jsonl:2: expected an object"):
        texts_for(spec, "train")
    path.write_text("not json\n")
    with pytest.raises(DataError, match=r"texts.jsonl:1: not a JSON object"):
        texts_for(spec, "train")


def test_evaluate_reports_quality_and_latency(tiny, capsys):
    path = str(tiny.model("llama"))
    capsys.readouterr()
    assert main(["evaluate", path, "--eval-tokens", "256", "--reference", path, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "perplexity" and 1.0 < result["perplexity"] < 10 * 256
    assert result["bos"] is False  # what was fed: the tiny tokenizer adds no BOS
    assert result["fidelity"]["max_abs_diff"] == 0.0
    assert result["latency_batch1"]["runs"] == 10 and result["latency_batch1"]["p50_ms"] > 0
    capsys.readouterr()
    bert = tiny.model("bert")
    assert main(["evaluate", str(bert), "--json"]) == 0
    encoder = json.loads(capsys.readouterr().out)
    accuracy = encoder["topic_accuracy"]
    assert "bos" not in encoder  # sentences carry the tokenizer's own [CLS]/[SEP]
    # The CLI reports the measure on the topic data's test split (ridge on train embeddings).
    expected = topic_accuracy(create_session(bert, provider="cpu"), bert.parent / "tokenizer")
    assert accuracy == pytest.approx(expected, abs=1e-12)
