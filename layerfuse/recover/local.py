"""Local reconstruction: recovery's first stage, repairing a tied FF where the damage is.

Global distillation pays a whole-model forward and backward per token (about 1 GFLOP for
SmolLM2-135M), so on a CPU it sees few tokens. A tied FF set, though, can be repaired
locally: each member block ``i`` of the original had an FF mapping its input ``x_i`` (after
the pre-FF norm) to ``y_i`` (the down-projection output, before the residual Add). The shared
weights are fitted jointly so that the one FF reproduces every member's map,

    loss = sum_i mean ||FF(x_i) - y_i||^2 / mean ||y_i||^2,

with Adam on cached activations and no backprop through the rest of the model: a step costs
one FF per member instead of the whole model, so hundreds of steps fit in minutes.

- The activations are tapped from the ORIGINAL graph in onnxruntime on training rows
  (:class:`~layerfuse.runtime.calibration.ActivationTap`), once; a held-out slice of the
  same rows gives the relative error reported before and after.
- The FF is the student's own subgraph between the member's FF input and output
  (:meth:`GraphModule.run_region`), on the student's parameters: SwiGLU, GELU, biases, Gemm
  or any family detection accepts, and the fitted weights are the KD stage's start.
- Inputs come from the original model (as the least-squares refit uses), or, with
  ``inputs="sequential"``, for the second half of the steps from the compressed model with
  the weights fitted so far (as GPTQ does; :mod:`layerfuse.recover.local_sequential`).
- Everything is seeded by its own generators: the global random state the KD stage uses
  is untouched, and ``steps=0`` does nothing at all, so a run without this stage is the run
  layerfuse made before it existed.

Pruned and fused plans have no tied set: for them this stage has nothing to reconstruct yet.
"""

from __future__ import annotations

__all__ = ["LocalSettings", "reconstruct"]

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from layerfuse.errors import LayerfuseError
from layerfuse.options import check_options, option
from layerfuse.progress import SILENT, Reporter
from layerfuse.recover.data import TrainingData
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.local_sequential import sequential_fit_rows
from layerfuse.recover.tied_sets import TiedSet, find_tied_sets
from layerfuse.runtime.calibration import ActivationTap, token_rows

INPUTS = ("original", "sequential")
NOTHING = "nothing to reconstruct (no tied FF set; pruned and fused plans are not fitted locally)"


@dataclass
class LocalSettings:
    """Defaults: 150 Adam steps of 256 tokens per member on 4,096 cached tokens per member,
    a few minutes for 10 tied SmolLM2-135M FFs on 2 CPU cores."""

    steps: int = option(
        150,
        "first stage: Adam steps fitting each tied FF set to its blocks' original FF outputs "
        "on cached activations, before distillation; 0 turns it off",
        name="--local-steps",
    )
    tokens: int = option(
        256, "tokens per tied block in each step of that fit", positive=True,
        name="--local-batch-tokens",
    )  # fmt: skip
    cache_tokens: int = option(
        4096, "training tokens cached per tied block for that fit", positive=True,
        name="--local-tokens",
    )  # fmt: skip
    eval_tokens: int = option(
        1024, "held-out tokens per tied block that measure the fit", positive=True,
        name="--local-eval-tokens",
    )  # fmt: skip
    lr: float = option(1e-2, "Adam learning rate of that fit", positive=True, name="--local-lr")
    # The local stage draws from the run's one --seed.
    seed: int = option(0, "", name=None)
    inputs: str = option(
        "original",
        "FF inputs of that fit: the original model's, or after half the steps those the "
        "compressed model produces (as GPTQ does)",
        name="--local-inputs",
        choices=INPUTS,
    )
    encoders: str = option(
        "skip",
        "the local stage on encoders: skip (on MiniLM-L6 it fitted the tied FFs' outputs yet "
        "lowered topic accuracy at 0, 1 and 5 CPU-minutes, where distillation alone raised "
        "it) or run",
        name="--local-encoders",
        choices=("skip", "run"),
    )

    def for_task(self, task: str) -> LocalSettings:
        """The settings a run of ``task`` uses: no steps on an encoder unless asked."""
        if task == "encoder" and self.encoders == "skip" and self.steps:
            return replace(self, steps=0)
        return self

    def run_key(self) -> dict:
        """What shapes the weights: ``encoders`` only through the steps it leaves."""
        return {k: v for k, v in asdict(self).items() if k != "encoders"}

    def learning_rate_factor(self, step: int) -> float:
        """Cosine decay from the full rate to 10% at the last step: a high rate finds the
        shared FF fast (on SmolLM2 1e-2 beat 3e-3 and 1e-3 after 40 steps), the decay settles it."""
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / max(1, self.steps))))

    def check(self) -> None:
        check_options(self)


@dataclass
class _Cache:
    """Per tapped tensor: fit rows, held-out rows (float32 ``[tokens, width]``), its rank;
    the tap and the row batches it ran, for the sequential variant to replay."""

    fit: dict[str, torch.Tensor]
    held_out: dict[str, torch.Tensor]
    rank: dict[str, int]
    tap: ActivationTap
    batches: list[np.ndarray]


def _collect(
    original: Path, data: TrainingData, names: list[str], settings: LocalSettings
) -> _Cache:
    """Tap ``names`` on the original for enough seeded training rows, batch by batch."""
    tap = ActivationTap(original, names, provider="cpu")
    order = np.random.default_rng([settings.seed, 25]).permutation(len(data))
    wanted = settings.cache_tokens + settings.eval_tokens
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    rank: dict[str, int] = {}
    tokens, batches = 0, []
    for first in range(0, len(order), 8):
        batches.append(order[first : first + 8])
        batch = data.batch(batches[-1])
        _, tapped = tap.run(batch.feeds)
        for name, value in tapped.items():
            rank[name] = value.ndim
            chunks[name].append(token_rows(value, batch.mask))
        tokens += int(batch.mask.sum())
        if tokens >= wanted:
            break
    rows = {name: torch.from_numpy(np.concatenate(parts)) for name, parts in chunks.items()}
    split = min(settings.cache_tokens, max(1, tokens * settings.cache_tokens // wanted))
    return _Cache(
        fit={name: value[:split] for name, value in rows.items()},
        held_out={name: value[split:] for name, value in rows.items()},
        rank=rank,
        tap=tap,
        batches=batches,
    )


def _member_error(
    student: GraphModule,
    region: tuple[str, str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """mean ||FF(x) - y||^2 / mean ||y||^2 of one member on rows ``inputs``/``targets``."""
    x = inputs.to(student.device)
    shaped = x.unsqueeze(0) if rank == 3 else x
    (out,) = student.run_region({region[0]: shaped}, [region[1]])
    out = out.reshape(-1, out.shape[-1]).float()
    return ((out - targets.to(student.device)) ** 2).mean() / scale.to(student.device)


def _held_out_errors(student: GraphModule, tied: TiedSet, cache: _Cache) -> list[float]:
    errors = []
    with torch.no_grad():
        for (x_name, y_name), region in zip(tied.targets, tied.regions, strict=True):
            y = cache.held_out[y_name]
            scale = (y**2).mean()
            rank = cache.rank[x_name]
            errors.append(
                float(_member_error(student, region, cache.held_out[x_name], y, scale, rank))
            )
    return errors


def _fit(student: GraphModule, tied: TiedSet, cache: _Cache, settings: LocalSettings) -> None:
    """Adam on the set's weights against every member's cached targets, jointly."""
    weights = student.named_weights()
    params = [weights[name] for name in tied.weights(student)]
    trainable = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.learning_rate_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    scales = [(cache.fit[y] ** 2).mean() for _, y in tied.targets]
    for _ in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for (x_name, y_name), region, scale in zip(tied.targets, tied.regions, scales, strict=True):
            count = cache.fit[x_name].shape[0]
            rows = torch.randint(count, (min(settings.tokens, count),), generator=generator)
            x, y = cache.fit[x_name][rows], cache.fit[y_name][rows]
            losses.append(_member_error(student, region, x, y, scale, cache.rank[x_name]))
        torch.stack(losses).sum().backward()
        optimizer.step()
        scheduler.step()
    for param, flag in zip(params, trainable, strict=True):
        param.grad = None
        param.requires_grad_(flag)


def _fit_set(
    student: GraphModule,
    original: ir.Model,
    tied: TiedSet,
    cache: _Cache,
    data: TrainingData,
    settings: LocalSettings,
) -> None:
    """Fit on the original's FF inputs; ``sequential``: half the steps so, then the rest on
    the inputs the compressed model now produces (:mod:`.local_sequential`)."""
    if settings.inputs == "original":
        _fit(student, tied, cache, settings)
        return
    first = replace(settings, steps=settings.steps // 2)
    _fit(student, tied, cache, first)
    count = next(iter(cache.fit.values())).shape[0]
    rows = sequential_fit_rows(
        student, original, tied, cache.tap, data, cache.batches, count, cache.rank
    )
    _fit(
        student,
        tied,
        replace(cache, fit={**cache.fit, **rows}),
        replace(settings, steps=settings.steps - first.steps),
    )


def _usable(student: GraphModule, sets: list[TiedSet]) -> tuple[list[TiedSet], list[str]]:
    """The sets whose FF regions run on their own; a note for each that does not."""
    usable, notes = [], []
    for tied in sets:
        try:
            tied.weights(student)
        except LayerfuseError as exc:
            notes.append(f"blocks {tied.blocks}: skipped, {exc}")
            continue
        usable.append(tied)
    return usable, notes


def reconstruct(
    original_path: Path,
    original: ir.Model,
    optimized: ir.Model,
    student: GraphModule,
    data: TrainingData,
    settings: LocalSettings,
    reporter: Reporter = SILENT,
) -> dict:
    """Fit every tied FF set of ``student`` in place; a summary for the recovery report."""
    started = time.perf_counter()
    summary: dict = {"steps": settings.steps, "inputs": settings.inputs, "sets": [], "notes": []}
    if settings.steps == 0:
        summary["notes"].append("off (--local-steps 0)")
        return summary
    sets, summary["notes"] = _usable(student, find_tied_sets(original, optimized))
    if not sets:
        summary["notes"].append(NOTHING)
        return {**summary, "seconds": time.perf_counter() - started}
    names = list(dict.fromkeys(n for tied in sets for pair in tied.targets for n in pair))
    reporter.step(f"local reconstruction: tapping {len(names)} tensors of the original")
    cache = _collect(original_path, data, names, settings)
    for tied in sets:
        reporter.step(f"local reconstruction: fitting the FF tied over blocks {tied.blocks}")
        before = _held_out_errors(student, tied, cache)
        _fit_set(student, original, tied, cache, data, settings)
        after = _held_out_errors(student, tied, cache)
        summary["sets"].append(
            {
                "blocks": tied.blocks,
                "weights": tied.weights(student),
                "relative_error_before": float(np.mean(before)),
                "relative_error_after": float(np.mean(after)),
                "per_block_before": before,
                "per_block_after": after,
            }
        )
    first = next(iter(cache.fit.values()))
    summary["fit_tokens_per_block"] = int(first.shape[0])
    summary["held_out_tokens_per_block"] = int(next(iter(cache.held_out.values())).shape[0])
    summary["seconds"] = time.perf_counter() - started
    return summary
