"""Torch modules that give every exported graph a small, fixed signature.

Hugging Face forwards take dozens of optional arguments and return nested outputs. The
wrappers pin the inputs (``input_ids`` + ``attention_mask``, or ``pixel_values``) and return
one tensor, so every graph of a task has the same interface for calibration, evaluation and
benchmarking, and a KV cache never sneaks into the export.
"""

from __future__ import annotations

__all__ = ["TASK_IO", "wrap_for_export"]

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


def wrap_for_export(model: torch.nn.Module, task: str) -> torch.nn.Module:
    wrapper = {"causal-lm": _CausalLM, "encoder": _Encoder, "vision": _Vision}[task]
    return wrapper(model).eval()
