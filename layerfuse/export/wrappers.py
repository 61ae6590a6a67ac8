"""Torch modules that give every exported graph a small, fixed signature.

Hugging Face forwards take dozens of optional arguments and return nested outputs. The
wrappers pin the inputs (``input_ids`` + ``attention_mask``, or ``pixel_values``) and return
one tensor, so every graph of a task has the same interface for calibration, evaluation and
benchmarking, and a KV cache never sneaks into the default export.

With ``kv_cache=True`` a causal LM gets the generation signature instead: flat past
key/value tensors in, flat presents out, named like onnxruntime-genai's builder graphs
(``past_key_values.N.key`` -> ``present.N.key``) so one decode loop and one genai config
template fit both. The cache object is built inside ``forward``: transformers 5 has no
tuple caches any more, and a ``DynamicCache`` cannot cross the export boundary.
"""

from __future__ import annotations

__all__ = ["TASK_IO", "CacheGeometry", "cache_geometry", "cache_io_names", "wrap_for_export"]

import inspect
from dataclasses import dataclass

import torch

# task -> (input names, output name)
TASK_IO = {
    "causal-lm": (("input_ids", "attention_mask"), "logits"),
    "encoder": (("input_ids", "attention_mask"), "last_hidden_state"),
    "vision": (("pixel_values",), "last_hidden_state"),
}


class _CausalLM(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.m(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=False
        )
        return output[0]


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class _Vision(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=pixel_values, return_dict=False)[0]


@dataclass(frozen=True)
class CacheGeometry:
    """What the KV cache of a causal LM looks like: per layer ``[batch, heads, len, dim]``."""

    num_layers: int
    kv_heads: int
    head_dim: int


def cache_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the KV-cache signature."""
    pasts = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    presents = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *pasts], ["logits", *presents]


def _cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _layers_of(output) -> list:
    cache = getattr(output, "cache", None)
    return list((output.past_key_values if cache is None else cache).layers)


def cache_geometry(model: torch.nn.Module) -> CacheGeometry:
    """Read the cache layout from one two-token forward (configs spell it many ways)."""
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[1, 2]]), use_cache=True, return_dict=True)
    layers = _layers_of(output)
    keys = layers[0].keys
    return CacheGeometry(len(layers), int(keys.shape[1]), int(keys.shape[3]))


class _CausalLMWithCache(torch.nn.Module):
    """``input_ids, attention_mask (past + current), position_ids, k0, v0, k1, v1, ...`` ->
    ``logits, present k0, v0, ...``. Position ids are always an input: with left padding
    absolute-position models (GPT-2) need them, and RoPE models cache rotated keys."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        super().__init__()
        self.m = model
        self.num_layers = num_layers
        self.keyword = _cache_keyword(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # No config: every layer keeps all its tokens. A sliding-window layer's cache counts
        # tokens from the past it is handed and branches on the count, so a graph traced below
        # the window would be wrong past it; the model's mask still applies the window.
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        output = self.m(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{self.keyword: cache},
        )
        presents = []
        for layer in _layers_of(output):
            presents += [layer.keys, layer.values]
        return (output.logits, *presents)


def wrap_for_export(
    model: torch.nn.Module, task: str, *, kv_cache: bool = False
) -> torch.nn.Module:
    if kv_cache:
        return _CausalLMWithCache(model, cache_geometry(model).num_layers).eval()
    wrapper = {"causal-lm": _CausalLM, "encoder": _Encoder, "vision": _Vision}[task]
    return wrapper(model).eval()
