"""The validation score early stopping and the best checkpoint are judged by (lower is better).

Causal LMs: perplexity of next-token prediction on the valid split, computed by the student
itself in torch (the same definition as :func:`layerfuse.runtime.quality.perplexity`).
Encoders have no next token: their score is the mean relative squared error of the output
against the teacher's on the valid split (teacher outputs computed once). In a distributed
run each process scores every ``world_size``-th batch and the sums are added up.
"""

from __future__ import annotations

__all__ = ["Validator"]

import math

import numpy as np
import torch

from layerfuse.data.batches import InputBatch
from layerfuse.recover.distributed import Distributed
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.objectives import Objective, next_token_nll
from layerfuse.recover.teacher import Teacher


class Validator:
    def __init__(self, batches: list[InputBatch], teacher: Teacher, task: str) -> None:
        self.task = task
        self.batches = [(teacher.feeds(b.feeds), b.mask) for b in batches]
        self.reference = (
            [teacher.run(feeds)[0] for feeds, _ in self.batches] if task != "causal-lm" else []
        )
        self._error = Objective("kd", task)

    @property
    def metric(self) -> str:
        return "perplexity" if self.task == "causal-lm" else "relative_error"

    @torch.no_grad()
    def score(self, student: GraphModule, dist: Distributed) -> float:
        student.eval()
        device = student.device
        total, count = 0.0, 0
        for index in range(dist.rank, len(self.batches), dist.world_size):
            feeds, mask = self.batches[index]
            inputs = {n: torch.from_numpy(feeds[n]).to(device) for n in student.input_names}
            output = student(inputs)[0][0]
            mask_t = torch.from_numpy(np.asarray(mask)).to(device)
            if self.task == "causal-lm":
                nll, pairs = next_token_nll(output, inputs["input_ids"], mask_t)
                total, count = total + float(nll), count + pairs
            else:
                reference = torch.from_numpy(self.reference[index]).to(device)
                total += float(self._error.loss_sum(output, {}, reference, {}, None, mask_t))
                count += int(mask.sum())
        total, count = dist.sum([total, float(count)])
        mean = total / max(count, 1.0)
        return math.exp(mean) if self.task == "causal-lm" else mean
