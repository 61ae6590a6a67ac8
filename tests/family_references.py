"""Torch references for the family matrix: each rewrite done by hand on the Hugging Face model.

They share no code with layerfuse's rewrites and find modules by their Hugging Face names
(which layerfuse never reads): what a rewritten ONNX graph computes is checked against the
tiny torch model of :mod:`tests.tiny_models` with the same surgery applied through forward
hooks or weight edits.

- prune a block: the layer returns its input;
- prune an FF / attention sublayer: its output projection returns zeros (with an output norm
  behind it, the norm of zeros is zero, so the sublayer's whole contribution goes, as in ONNX);
- merge: the FF linears of a window are replaced by their average, the vanilla tie;
- fuse: the dropped attentions' output projections return zeros and every layer of a run
  reads the run's input, ``x + sum_k (L_k(x) - x)``: FFN Fusion's parallel form.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import cache

import numpy as np
import torch

from layerfuse.export.wrappers import wrap_for_export
from tests import tiny_models

_LLAMA = ("model.layers", "self_attn.o_proj", "mlp.down_proj")
_BERT = ("encoder.layer", "attention.output.dense", "output.dense")
_VIT = ("layers", "attention.o_proj", "mlp.fc2")
_NEOX = ("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h")
_OPT = ("model.decoder.layers", "self_attn.out_proj", "fc2")
_FALCON = ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h")
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo2")

# family -> (layer list, attention output projection, FF output projection), per layer.
SUBLAYERS = {
    **{family: _LLAMA for family in (*_LLAMA_LIKE, "phi3")},
    "phi": ("model.layers", "self_attn.dense", "mlp.fc2"),
    "gpt2": ("transformer.h", "attn.c_proj", "mlp.c_proj"),
    "gpt_neox": _NEOX,
    "gpt_neox_seq": _NEOX,
    "opt": _OPT,
    "opt_postnorm": _OPT,
    "falcon": _FALCON,
    "falcon_new": _FALCON,
    "gptj": ("transformer.h", "attn.out_proj", "mlp.fc_out"),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm_roberta": _BERT,
    "distilbert": ("transformer.layer", "attention.out_lin", "ffn.lin2"),
    "vit": _VIT,
    "deit": _VIT,
}
# family -> the FF's linear modules of a layer (what a merge ties).
FF_LINEARS = {
    **{family: ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") for family in _LLAMA_LIKE},
    "phi3": ("mlp.gate_up_proj", "mlp.down_proj"),
    "phi": ("mlp.fc1", "mlp.fc2"),
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
    "gpt_neox": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "gpt_neox_seq": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "opt": ("fc1", "fc2"),
    "opt_postnorm": ("fc1", "fc2"),
    "falcon": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "falcon_new": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "gptj": ("mlp.fc_in", "mlp.fc_out"),
    **{f: ("intermediate.dense", "output.dense") for f in ("bert", "roberta", "xlm_roberta")},
    "distilbert": ("ffn.lin1", "ffn.lin2"),
    "vit": ("mlp.fc1", "mlp.fc2"),
    "deit": ("mlp.fc1", "mlp.fc2"),
}
ENCODERS = ("bert", "roberta", "xlm_roberta", "distilbert")


def task(family: str) -> str:
    if family in tiny_models.VISION:
        return "vision"
    return "encoder" if family in ENCODERS else "causal-lm"


def feeds(family: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs for both runtimes and the mask of positions to compare (None: all).

    The second row is right-padded, so every check also covers masked positions' influence.
    """
    rng = np.random.default_rng(7)
    if family in tiny_models.VISION:
        return {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}, None
    ids = rng.integers(3, tiny_models.VOCAB_SIZE, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}, mask.astype(bool)


def module(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("hidden_state"))


def _with_input(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else "hidden_state"
    return args, {**kwargs, key: x}


def _replace_output(output, tensor: torch.Tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _skip_layer(layer: torch.nn.Module) -> object:
    def hook(module, args, kwargs, output):
        return _replace_output(output, _layer_input(args, kwargs))

    return layer.register_forward_hook(hook, with_kwargs=True)


def _zero(projection: torch.nn.Module) -> object:
    return projection.register_forward_hook(lambda module, args, output: torch.zeros_like(output))


def _parallel_run(layers: list[torch.nn.Module]) -> list:
    """Hooks that make ``layers`` all read the first one's input and sum their updates.

    The first layer's hook records its input ``x`` and update; each later layer is run
    again on ``x`` (its own input ignored) and adds its update; the last returns the sum.
    """
    state: dict = {}

    def first(module, args, kwargs, output):
        state["x"] = _layer_input(args, kwargs)
        state["sum"] = _first(output) - state["x"]

    def later(module, args, kwargs, output):
        if state.get("busy"):
            return None
        state["busy"] = True
        args, kwargs = _with_input(args, kwargs, state["x"])
        update = _first(module(*args, **kwargs)) - state["x"]
        state["busy"] = False
        state["sum"] = state["sum"] + update
        if module is layers[-1]:
            return _replace_output(output, state["x"] + state["sum"])
        return None

    hooks = [layers[0].register_forward_hook(first, with_kwargs=True)]
    hooks += [layer.register_forward_hook(later, with_kwargs=True) for layer in layers[1:]]
    return hooks


def _average(layers: list[torch.nn.Module], family: str) -> None:
    with torch.no_grad():
        for name in FF_LINEARS[family]:
            linears = [module(layer, name) for layer in layers]
            for attribute in ("weight", "bias"):
                tensors = [getattr(linear, attribute, None) for linear in linears]
                if tensors[0] is None:
                    continue
                mean = torch.stack([t.data for t in tensors]).mean(0)
                for tensor in tensors:
                    tensor.data.copy_(mean)


@cache
def original(family: str) -> np.ndarray:
    """The unmodified tiny torch model's output on :func:`feeds` (computed once)."""
    return run(family, feeds(family)[0], "none")


def run(family: str, inputs: dict[str, np.ndarray], operation: str, **how) -> np.ndarray:
    """The tiny torch model's output after ``operation``:

    ``none``; ``prune`` (``target`` block/ff/attention, ``blocks``); ``merge`` (``blocks``);
    ``fuse`` (``drop`` attentions, ``runs`` of (first, last) blocks).
    """
    model = tiny_models.make_model(family)
    layers_path, attention_out, ff_out = SUBLAYERS[family]
    layers = list(module(model, layers_path))
    with ExitStack() as hooks:
        if operation == "prune":
            for index in how["blocks"]:
                if how["target"] == "block":
                    hooks.callback(_skip_layer(layers[index]).remove)
                else:
                    name = ff_out if how["target"] == "ff" else attention_out
                    hooks.callback(_zero(module(layers[index], name)).remove)
        elif operation == "merge":
            _average([layers[i] for i in how["blocks"]], family)
        elif operation == "fuse":
            for index in how["drop"]:
                hooks.callback(_zero(module(layers[index], attention_out)).remove)
            for first, last in how["runs"]:
                for hook in _parallel_run(layers[first : last + 1]):
                    hooks.callback(hook.remove)
        wrapper = wrap_for_export(model, task(family))
        with torch.no_grad():
            return wrapper(*(torch.from_numpy(v) for v in inputs.values())).numpy()
