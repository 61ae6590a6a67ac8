"""Perplexity and output fidelity hold one batch's logits, never a data set's.

A fake session returns fresh large logits per batch; tracemalloc (which numpy reports its
buffers to) measures the peak extra memory of a whole perplexity computation. With a 262k
vocabulary the old float64 log-softmax of a batch took three times the batch's logits in
doubles (12.5 GB for `fuse` on Gemma-3-270M); now the bound is one batch's logits plus a
chunk of rows, and it does not move with the number of batches.
"""

from __future__ import annotations

import math
import tracemalloc
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from scipy.special import log_softmax

from layerfuse.data.batches import InputBatch, make_batches
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.runtime import quality
from layerfuse.runtime.calibration import ActivationTap, _cut_to
from layerfuse.runtime.quality import next_token_nll, output_fidelity, perplexity

BATCH, SEQ, VOCAB = 4, 32, 8192
LOGITS_BYTES = BATCH * SEQ * VOCAB * 4
CHUNK = 2**20


class FakeSession:
    """An onnxruntime-like session whose logits depend only on the input ids (seeded)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def get_inputs(self):
        return [
            SimpleNamespace(name=n, type="tensor(int64)", shape=["b", "s"])
            for n in ("input_ids", "attention_mask")
        ]

    def get_outputs(self):
        return [SimpleNamespace(name="logits")]

    def run(self, names, feeds):
        seed = int(feeds["input_ids"].sum())
        logits = np.random.default_rng(seed).standard_normal((BATCH, SEQ, VOCAB), dtype=np.float32)
        return [logits * np.float32(self.scale)]


def _batches(count: int) -> list[InputBatch]:
    rng = np.random.default_rng(count)
    batches = []
    for _ in range(count):
        ids = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, SEQ // 2 :] = 0
        batches.append(InputBatch({"input_ids": ids, "attention_mask": mask}, mask))
    return batches


def _peak(work) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_perplexity_peak_memory_is_one_batch_of_logits_whatever_the_batch_count(monkeypatch):
    monkeypatch.setattr(quality, "CHUNK_BYTES", CHUNK)
    session = FakeSession()
    few, many = _batches(2), _batches(12)
    peak_few = _peak(lambda: perplexity(session, few))
    peak_many = _peak(lambda: perplexity(session, many))
    # The fake's own ``logits * scale`` makes two arrays of one batch at once; the chunk
    # adds its float64 rows and their exponentials. A whole-batch float64 log-softmax
    # would add 6 x LOGITS_BYTES, holding all batches 12 x LOGITS_BYTES.
    assert peak_many <= peak_few + 2**20
    assert peak_many <= 2 * LOGITS_BYTES + 3 * CHUNK + 2**20


def test_output_fidelity_peak_memory_does_not_grow_with_batches(monkeypatch):
    monkeypatch.setattr(quality, "CHUNK_BYTES", CHUNK)
    reference, candidate = FakeSession(), FakeSession(scale=1.5)
    few, many = _batches(2), _batches(12)
    peak_few = _peak(lambda: output_fidelity(reference, candidate, few))
    peak_many = _peak(lambda: output_fidelity(reference, candidate, many))
    assert peak_many <= peak_few + 2**20
    assert peak_many <= 4 * LOGITS_BYTES + 3 * CHUNK + 2**20
    fidelity = output_fidelity(reference, candidate, few)
    assert fidelity.mean_cosine == pytest.approx(1.0, abs=1e-6)
    assert fidelity.max_abs_diff > 1.0


def _unchunked_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    log_probs = log_softmax(logits[:, :-1].astype(np.float64), axis=-1)
    picked = np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    return -float(picked[valid].sum()), int(valid.sum())


@pytest.mark.parametrize("chunk_bytes", [1, 8 * VOCAB * 7, 2**40])
def test_chunked_nll_equals_the_whole_batch_log_softmax(chunk_bytes):
    batch = _batches(1)[0]
    ids, mask = batch.feeds["input_ids"], batch.mask
    logits = FakeSession(scale=4.0).run(["logits"], batch.feeds)[0]
    expected, count = _unchunked_nll(logits, ids, mask)
    actual, actual_count = next_token_nll(logits, ids, mask, chunk_bytes)
    assert actual_count == count == BATCH * (SEQ - 1) - (SEQ // 2)
    assert actual == pytest.approx(expected, rel=1e-6)
    assert math.isclose(actual / count, expected / count, rel_tol=1e-9)


def test_nll_of_fp16_logits_is_computed_in_float64():
    """fp16 graphs return fp16 logits, whose exponentials overflow fp16 past 11.1."""
    batch = _batches(1)[0]
    ids, mask = batch.feeds["input_ids"], batch.mask
    logits = FakeSession(scale=8.0).run(["logits"], batch.feeds)[0].astype(np.float16)
    expected, _ = _unchunked_nll(logits.astype(np.float64), ids, mask)
    actual, _ = next_token_nll(logits, ids, mask, CHUNK)
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(logits)).any()
    assert math.isfinite(actual) and actual == pytest.approx(expected, rel=1e-9)


def test_tap_without_model_outputs_runs_only_what_the_taps_need(tiny):
    """Tapping block 1's FF input cuts the graph there: no head, no logits, no later block,
    and the tapped values are the full graph's."""
    path = tiny.model("llama")
    blocks = detect_structure(load_model(path)).blocks
    name = blocks[1].ff.input.name
    full = ActivationTap(path, [name], provider="cpu")
    cut = ActivationTap(path, [name], provider="cpu", model_outputs=False)
    assert [o.name for o in cut.session.get_outputs()] == [name]
    batch = make_batches(path, "random", "calib", tokens=64, seq_len=16, batch_size=4)[0]
    outputs, tapped = cut.run(batch.feeds)
    assert outputs == []
    np.testing.assert_array_equal(tapped[name], full.tapped(batch.feeds)[name])
    graph = onnx.load(path, load_external_data=False).graph
    before = len(graph.node)
    _cut_to(graph, [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)])
    kept = {node.name for node in graph.node}
    later = {linear.node.name for b in blocks[1:] for linear in b.ff.linears.values()}
    assert later and not later & kept and len(kept) < before
    assert "logits" not in {value for node in graph.node for value in node.output}
