"""Reference computations in torch, from the Hugging Face modules, for tests of rewrites.

They share no code with layerfuse's rewrites: what a rewritten ONNX graph computes is checked
against what the original torch modules compute when the same surgery is done by hand.
"""

from __future__ import annotations

import numpy as np
import torch

from tests import tiny_models


def ffn_sublayers(family: str) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(pre-FFN norm, FFN) of every layer of the tiny torch model of ``family``."""
    model = tiny_models.make_model(family)
    if family == "llama":
        return [(layer.post_attention_layernorm, layer.mlp) for layer in model.model.layers]
    if family == "gpt2":
        return [(block.ln_2, block.mlp) for block in model.transformer.h]
    if family == "vit":
        return [(layer.layernorm_after, layer.mlp) for layer in model.encoder.layer]
    raise ValueError(f"no FFN sublayers for {family}")


def parallel_ffn_sum(family: str, blocks: list[int], x: np.ndarray) -> np.ndarray:
    """``sum_k FFN_k(norm_k(x))`` over ``blocks``: FFN Fusion's parallel form, in torch."""
    sublayers = ffn_sublayers(family)
    with torch.no_grad():
        inputs = torch.from_numpy(np.asarray(x, np.float32))
        total = sum(sublayers[k][1](sublayers[k][0](inputs)) for k in blocks)
    return total.numpy()
