"""Sequential inputs for local reconstruction: what the compressed model really feeds its FFs.

Fitting a tied FF on the ORIGINAL model's FF inputs ignores that, in the compressed model,
each member's input already carries the error of every compressed sublayer before it. The
sequential variant (GPTQ's order) refits on the inputs the compressed model produces, with
the weights fitted so far (earlier tied sets, and this set after its first half of steps):
``x_i`` is tapped from the student graph run in torch on the same cached rows, and the
target is what the ORIGINAL block's FF makes of that input, ``y_i = FF_i^orig(x_i)``, its
own subgraph run in torch on the original's weights.
"""

from __future__ import annotations

__all__ = ["sequential_fit_rows"]

import numpy as np
import onnx_ir as ir
import torch

from layerfuse.recover.data import TrainingData
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.tied_sets import TiedSet
from layerfuse.runtime.calibration import ActivationTap, adapt_feeds, token_rows


def _student_inputs(
    student: GraphModule, tied: TiedSet, tap: ActivationTap, data: TrainingData, batches: list
) -> list[torch.Tensor]:
    """Each member's FF input in the student graph, as token rows, over ``batches``."""
    names = [region[0] for region in tied.regions]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    student.eval()
    with torch.no_grad():
        for indices in batches:
            batch = data.batch(indices)
            feeds = adapt_feeds(tap.session, batch.feeds)
            inputs = {n: torch.from_numpy(feeds[n]).to(student.device) for n in student.input_names}
            _, tapped = student(inputs, names)
            for chunk, name in zip(chunks, names, strict=True):
                chunk.append(token_rows(tapped[name].float().cpu().numpy(), batch.mask))
    return [torch.from_numpy(np.concatenate(chunk)) for chunk in chunks]


def sequential_fit_rows(
    student: GraphModule,
    original: ir.Model,
    tied: TiedSet,
    tap: ActivationTap,
    data: TrainingData,
    batches: list,
    count: int,
    ranks: dict[str, int],
) -> dict[str, torch.Tensor]:
    """Fit rows keyed like the cache (the original's tap names): the student's FF inputs on
    the first ``count`` cached tokens and the original FFs' outputs on them."""
    teacher = GraphModule(original, trainable=set())
    rows: dict[str, torch.Tensor] = {}
    inputs = _student_inputs(student, tied, tap, data, batches)
    with torch.no_grad():
        for (x_name, y_name), member_inputs in zip(tied.targets, inputs, strict=True):
            x = member_inputs[:count]
            shaped = x.unsqueeze(0) if ranks[x_name] == 3 else x
            (y,) = teacher.run_region({x_name: shaped}, [y_name])
            rows[x_name], rows[y_name] = x, y.reshape(-1, y.shape[-1]).float()
    return rows
