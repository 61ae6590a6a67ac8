"""One call that scores a graph the way reports need it: quality on real data and speed.

The metric follows the model's task (manifest): perplexity for causal LMs, topic accuracy for
encoders; with a ``reference`` graph, output fidelity to it on the same inputs as well.
The result says what was fed: ``bos`` tells whether packed text windows started with BOS
(a perplexity with and without it can differ tenfold, so a number without it is ambiguous).
"""

from __future__ import annotations

__all__ = ["QUALITY_DIRECTION", "evaluate_model", "quality_metric", "topic_accuracy"]

import os
from pathlib import Path

import numpy as np

from layerfuse.data import corpus
from layerfuse.data.batches import InputBatch, fed_bos, make_batches, parse_spec
from layerfuse.data.tokens import load_tokenizer, sentence_batches
from layerfuse.model.manifest import require_manifest
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import adapt_feeds
from layerfuse.runtime.measure import measure_latency
from layerfuse.runtime.quality import (
    output_fidelity,
    perplexity,
    ridge_accuracy,
    sentence_embeddings,
)
from layerfuse.runtime.session import create_session

# +1: higher is better, -1: lower is better.
QUALITY_DIRECTION = {"perplexity": -1, "topic_accuracy": 1, "mean_cosine": 1}


def quality_metric(task: str, data: str) -> str:
    """The headline quality metric for a task and data spec."""
    if task == "causal-lm" and data != "random":
        return "perplexity"
    if task == "encoder" and parse_spec(data).kind == "fortunes":
        return "topic_accuracy"
    return "mean_cosine"


def topic_accuracy(session, tokenizer_dir: Path, reporter: Reporter = SILENT) -> float:
    """Test accuracy of a ridge classifier on this graph's embeddings of the topic data."""
    tokenizer = load_tokenizer(tokenizer_dir)
    splits = {}
    for split in ("train", "test"):
        texts, labels, _ = corpus.topic_dataset(split)
        # Batching texts of similar length wastes little compute on padding.
        order = np.argsort([len(text) for text in texts], kind="stable")
        texts = [texts[i] for i in order]
        batches = [
            InputBatch(b.feeds(), b.attention_mask)
            for b in sentence_batches(tokenizer, texts, max_length=128, batch_size=16)
        ]
        embeddings = sentence_embeddings(session, batches, reporter)
        splits[split] = (embeddings, np.asarray(labels)[order])
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    return ridge_accuracy(train_x, train_y, test_x, test_y)


def evaluate_model(
    model_path: str | os.PathLike,
    *,
    data: str = "fortunes",
    tokens: int = 8192,
    seq_len: int = 128,
    provider: str = "auto",
    reference: str | os.PathLike | None = None,
    latency_runs: int = 10,
    reporter: Reporter = SILENT,
) -> dict:
    """Quality (task metric, fidelity to ``reference``) and batch-1 latency of a graph."""
    model_path = Path(model_path)
    manifest = require_manifest(model_path)
    spec = parse_spec(data)
    session = create_session(model_path, provider=provider)
    batches = make_batches(model_path, spec, "test", tokens=tokens, seq_len=seq_len, batch_size=4)
    metric = quality_metric(manifest.task, str(spec))
    result: dict = {"model": str(model_path), "task": manifest.task, "data": str(spec)}
    bos = fed_bos(model_path, spec)
    if bos is not None:
        result["bos"] = bos
        reporter.step(f"windows of {seq_len} tokens, {'starting with' if bos else 'without'} BOS")
    if metric == "perplexity":
        result["perplexity"] = perplexity(session, batches, reporter)
    elif metric == "topic_accuracy":
        tokenizer_dir = model_path.parent / (manifest.tokenizer or "tokenizer")
        result["topic_accuracy"] = topic_accuracy(session, tokenizer_dir, reporter)
    if reference is not None:
        reference_session = create_session(reference, provider=provider)
        fidelity = output_fidelity(reference_session, session, batches, reporter)
        result["fidelity"] = fidelity.to_json()
        result["mean_cosine"] = fidelity.mean_cosine
    first = {name: value[:1] for name, value in batches[0].feeds.items()}
    latency = measure_latency(session, adapt_feeds(session, first), runs=latency_runs)
    shape = {name: list(value.shape) for name, value in first.items()}
    result["latency_batch1"] = {"input_shapes": shape, **latency.to_json()}
    result["metric"] = metric
    return result
