"""One decoder graph with its KV cache kept in onnxruntime, step by step.

The cache never leaves the device: every run binds the previous presents (``OrtValue``s that
onnxruntime allocated) as the next pasts through IO binding, on CPU and CUDA alike, so a
decode step copies only the new token ids in and the last logits out. Which output continues
which input is found by dataflow (:mod:`layerfuse.model.cache`), the same check the export
runs, and a graph with a cache input nothing continues is refused in one line before any run
(onnxruntime would stop at the first step on the input left unfed). A sliding-window layer
whose present keeps only the window's last tokens is carried on as it is. The names of the
token, mask and position inputs and of the logits come from the manifest.

Padding follows the graph: graphs that take ``position_ids`` (torch exports) get prompts
padded on the left with positions counted over real tokens, as Hugging Face's ``generate``
does; graphs without them (onnxruntime-genai's GroupQueryAttention graphs, which read only
per-row token counts from the mask) get prompts padded on the right, as onnxruntime-genai
does, and each row's logits are read at its own last token.

CUDA graphs are not used: onnxruntime replays a captured graph only when every input and
output keeps its shape and address, and a cache that grows by concatenation changes both on
every step.
"""

from __future__ import annotations

__all__ = ["Decoder", "pad_prompts"]

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from layerfuse.errors import DataError
from layerfuse.model.cache import CacheEntry, paired_cache
from layerfuse.model.manifest import require_manifest
from layerfuse.runtime.session import PROVIDERS, create_session, resolve_provider

_ITEMSIZES = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2}
_NO_CACHE = (
    "{path} has no KV-cache inputs (past keys and values), so every token would recompute the "
    "whole prompt; export it with 'layerfuse export MODEL -o DIR --kv-cache' or use an "
    "onnxruntime-genai builder folder"
)


def pad_prompts(prompts: list[list[int]], side: str, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask ``[batch, longest]`` with padding on ``side`` (left or right)."""
    width = max(len(prompt) for prompt in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span] = prompt
        mask[row, span] = 1
    return ids, mask


class Decoder:
    """A decoder graph run one step at a time with its cache kept in onnxruntime."""

    def __init__(
        self, model_path: str | os.PathLike, *, provider: str = "auto", threads: int | None = None
    ) -> None:
        self.model_path = Path(model_path)
        self.manifest = require_manifest(self.model_path)
        proto = onnx.load(self.model_path, load_external_data=False)
        graph = ir.serde.deserialize_model(proto).graph
        self.entries: list[CacheEntry] = paired_cache(graph, str(self.model_path))
        if not self.entries:
            raise DataError(_NO_CACHE.format(path=self.model_path))
        names = {value.name for value in graph.inputs}
        self.input_ids, self.attention_mask = self.manifest.inputs[:2]
        self.position_ids = "position_ids" if "position_ids" in names else None
        self.logits = self.manifest.output
        self.padding = "left" if self.position_ids else "right"
        self.session = create_session(self.model_path, provider=provider, threads=threads)
        cuda = resolve_provider(provider) == PROVIDERS["cuda"]
        self.device = "cuda" if cuda else "cpu"
        self._cache: dict[str, ort.OrtValue] = {}
        self._mask = np.zeros((0, 0), np.int64)
        self._last = np.zeros(0, np.int64)

    @property
    def context_length(self) -> int | None:
        return self.manifest.generation.get("context_length")

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence occupies, from the graph's declared cache."""
        return sum(entry.bytes_per_token() for entry in self.entries)

    def cache_bytes(self) -> int:
        """Bytes the cache holds now (all rows, all layers), from the live tensors."""
        return sum(
            int(np.prod(value.shape())) * _ITEMSIZES.get(value.data_type(), 4)
            for value in self._cache.values()
        )

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty_cache(self, batch: int) -> dict[str, ort.OrtValue]:
        return {
            e.past.name: self._value(np.zeros((batch, e.heads, 0, e.head_dim), e.dtype.numpy()))
            for e in self.entries
        }

    def _checked_cache(self, cache: dict, batch: int, past: int) -> dict[str, ort.OrtValue]:
        """The cache as device values, or one clear line on what does not fit."""
        checked = {}
        for entry in self.entries:
            name = entry.past.name
            if name not in cache:
                raise DataError(f"the cache has no tensor for graph input '{name}'")
            value = cache[name]
            if not isinstance(value, ort.OrtValue):
                value = self._value(np.asarray(value, entry.dtype.numpy()))
            kept = past if entry.window is None else min(past, entry.window)
            expected = [batch, entry.heads, kept, entry.head_dim]
            if list(value.shape()) != expected:
                raise DataError(
                    f"cache tensor '{name}' has shape {list(value.shape())}; this graph and "
                    f"prompt need {expected} [batch, kv heads, past tokens, head size]"
                )
            checked[name] = value
        return checked

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self._value(array))
        for name, value in self._cache.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.logits, "cpu")
        for entry in self.entries:
            binding.bind_output(entry.present.name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._cache = {
            entry.past.name: value for entry, value in zip(self.entries, outputs[1:], strict=True)
        }
        return outputs[0].numpy()

    def start(self, ids: np.ndarray, mask: np.ndarray, cache: dict | None = None) -> np.ndarray:
        """Prefill ``ids`` (padded as :attr:`padding` says; ``mask`` covers the cached tokens
        and these) after ``cache`` (default: empty), and return the logits of each row's last
        real token ``[batch, vocab]``."""
        batch, length = ids.shape
        past = mask.shape[1] - length
        cache = self.empty_cache(batch) if cache is None else cache
        self._cache = self._checked_cache(cache, batch, past)
        feeds = {self.input_ids: ids, self.attention_mask: mask}
        if self.position_ids:
            feeds[self.position_ids] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past:]
        logits = self._run(feeds)
        self._mask = mask
        self._last = mask.sum(axis=1) - 1
        if self.padding == "left":
            return logits[:, -1]
        return logits[np.arange(batch), mask[:, past:].sum(axis=1) - 1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row; return the next logits ``[batch, vocab]``."""
        batch = tokens.shape[0]
        self._mask = np.concatenate([self._mask, np.ones((batch, 1), np.int64)], axis=1)
        self._last = self._last + 1
        feeds = {self.input_ids: tokens.reshape(batch, 1).astype(np.int64)}
        feeds[self.attention_mask] = self._mask
        if self.position_ids:
            feeds[self.position_ids] = self._last.reshape(batch, 1)
        return self._run(feeds)[:, -1]

    def repeat_rows(self, copies: int) -> None:
        """Make every row of the state (cache, mask, positions) ``copies`` consecutive rows:
        the state a prefill of each prompt ``copies`` times would leave, for one prefill. A
        decode step's cost depends only on the shapes, so benchmarks decode a big batch at a
        long context this way without a prefill of batch x context tokens. On CUDA the cache
        passes through host memory once."""
        self._cache = {
            name: self._value(np.repeat(value.numpy(), copies, axis=0))
            for name, value in self._cache.items()
        }
        self._mask = np.repeat(self._mask, copies, axis=0)
        self._last = np.repeat(self._last, copies)

    @property
    def cache(self) -> dict[str, ort.OrtValue]:
        return dict(self._cache)
