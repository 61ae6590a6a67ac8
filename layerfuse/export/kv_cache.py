"""The KV-cache signature of a causal-LM export: trace inputs, dynamic shapes, verification.

What torch.export needs (measured with torch 2.13 and transformers 5.24): the attention mask
spans past + current tokens and gets its own dimension (``Dim + Dim`` is refused), the flat
past tensors get a *tuple* of specs, and the traced example has at least two new tokens (a
one-token trace turns SDPA's ``is_causal`` into a symbolic bool and fails). Position ids are
always passed, counted over real tokens like Hugging Face's ``generate`` does.

Verification runs the graph the way generation will: a prefill of left-padded prompts from
an empty cache, then one decode step fed with the graph's own presents, both compared with
the wrapped torch model on the positions the mask marks valid (fully masked rows of padding
differ between runtimes by design and are never attended to). onnxruntime continues its
cache through the pairing ``generate`` uses (:func:`layerfuse.model.cache.paired_cache`), so
an export whose cache the decode loop could not carry is refused here, before it is written.
"""

from __future__ import annotations

__all__ = [
    "cache_dynamic_shapes",
    "cache_routes",
    "cache_trace_args",
    "check_cache_export",
    "generation_summary",
    "left_padded",
    "verify_with_cache",
]

import numpy as np
import onnx
import onnx_ir as ir
import torch

from layerfuse.errors import LayerfuseError
from layerfuse.export.sources import ModelSource
from layerfuse.export.wrappers import CacheGeometry, cache_io_names
from layerfuse.model.cache import paired_cache

_TRACE_PAST = 5


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's positions: real tokens count from 0, padding gets 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def left_padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of ``texts``, padded on the left as generation expects."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
        mask[index, width - len(row) :] = 1
    return ids, mask


def cache_trace_args(tokenizer, texts: list[str], geometry: CacheGeometry) -> tuple:
    """Example inputs for the export: the texts after a random cache of a few tokens."""
    ids, mask = left_padded(tokenizer, texts)
    batch = ids.shape[0]
    full_mask = torch.cat([torch.ones(batch, _TRACE_PAST, dtype=torch.int64), mask], dim=1)
    generator = torch.Generator().manual_seed(0)
    shape = (batch, geometry.kv_heads, _TRACE_PAST, geometry.head_dim)
    past = [torch.randn(shape, generator=generator) for _ in range(2 * geometry.num_layers)]
    return (ids, full_mask, position_ids(full_mask)[:, _TRACE_PAST:], *past)


def cache_dynamic_shapes(num_layers: int) -> dict:
    dim = torch.export.Dim
    batch, sequence = dim("batch"), dim("sequence")
    past, total = dim("past_sequence"), dim("total_sequence")
    return {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
    }


def _valid_diff(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """Largest difference over positions ``mask`` marks valid (positions on ``axis``)."""
    moved_a = np.moveaxis(actual, axis, 1)
    moved_e = np.moveaxis(expected, axis, 1)
    valid = mask.astype(bool)
    return float(np.max(np.abs(moved_a[valid] - moved_e[valid])))


def cache_routes(session) -> dict[str, int]:
    """Past input -> index of the session output that continues it, paired the way
    ``generate`` pairs them (:func:`paired_cache`): an export whose cache the decode loop
    could not carry fails here, in one line, instead of at the user's first step."""
    proto = onnx.load(session._model_path, load_external_data=False)
    graph = ir.serde.deserialize_model(proto).graph
    outputs = [output.name for output in session.get_outputs()]
    entries = paired_cache(graph, "the exported graph")
    return {entry.past.name: outputs.index(entry.present.name) for entry in entries}


def _step(wrapper, session, names, ids, mask, past_torch, past_ort: dict):
    """One step in torch and in onnxruntime, each continuing its own cache."""
    positions = position_ids(mask)[:, -ids.shape[1] :]
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(ids, mask, positions, *past_torch)]
    feeds = dict(zip(names, [ids.numpy(), mask.numpy(), positions.numpy()], strict=False))
    return expected, session.run(None, feeds | past_ort)


def verify_with_cache(
    wrapper, session, tokenizer, texts: list[str], geometry: CacheGeometry
) -> dict[str, float]:
    """Max |onnxruntime - torch| of a prefill from an empty cache and of one decode step.

    Torch continues its own presents in signature order; onnxruntime is fed its presents by
    :func:`cache_routes`, as the decode loop will feed them."""
    names, _ = cache_io_names(geometry.num_layers)
    routes = cache_routes(session)
    ids, mask = left_padded(tokenizer, texts)
    batch = ids.shape[0]
    empty = torch.zeros(batch, geometry.kv_heads, 0, geometry.head_dim)
    past = [empty] * (2 * geometry.num_layers)
    feeds = dict.fromkeys(names[3:], empty.numpy())
    expected, actual = _step(wrapper, session, names, ids, mask, past, feeds)
    real = mask.numpy()
    prefill = max(
        _valid_diff(actual[0], expected[0], real, 1),
        *(_valid_diff(a, e, real, 2) for a, e in zip(actual[1:], expected[1:], strict=True)),
    )
    following = torch.from_numpy(expected[0][:, -1].argmax(-1))[:, None]
    longer = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
    past_torch = [torch.from_numpy(t) for t in expected[1:]]
    feeds = {name: actual[index] for name, index in routes.items()}
    expected, actual = _step(wrapper, session, names, following, longer, past_torch, feeds)
    decode = max(
        float(np.max(np.abs(actual[0] - expected[0]))),
        *(
            _valid_diff(a, e, longer.numpy(), 2)
            for a, e in zip(actual[1:], expected[1:], strict=True)
        ),
    )
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode}


def check_cache_export(source: ModelSource, exporter: str) -> None:
    if source.task != "causal-lm":
        raise LayerfuseError(
            f"--kv-cache exports the generation signature of causal LMs; '{source.name}' is "
            f"a {source.task} model"
        )
    if exporter != "dynamo":
        raise LayerfuseError("--kv-cache needs the dynamo exporter")
    if source.tokenizer is None:
        raise LayerfuseError(f"model '{source.name}' has no tokenizer; cannot build text inputs")
    if source.tokenizer.pad_token is None:
        source.tokenizer.pad_token = source.tokenizer.eos_token


def generation_summary(source: ModelSource, geometry) -> dict:
    """What a decode loop needs to know beyond the graph: the cache and the special tokens."""
    config = source.config
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return {
        "kv_cache": True,
        "num_layers": geometry.num_layers,
        "kv_heads": geometry.kv_heads,
        "head_dim": geometry.head_dim,
        "context_length": None if context is None else int(context),
        "eos_token_id": source.tokenizer.eos_token_id,
        "bos_token_id": source.tokenizer.bos_token_id,
        "padding": "left",
    }
