"""The training loop: AdamW, warm-up and cosine decay, accumulation, validation, checkpoints.

One optimizer step reads a global batch of ``batch_size * grad_accum`` rows (fixed by the
seed and the step), split into ``grad_accum`` micro-batches, each shared out over the
processes of a distributed run. The loss of every micro-batch is a sum of per-token terms
divided by the term count of the whole step (see :mod:`layerfuse.recover.objectives`), so
the update is the same however the batch is split.

Validation runs every ``eval_every`` steps and at step 0: perplexity of next-token prediction
on the valid split for causal LMs, the relative error of the output against the teacher for
encoders. The best score's parameters are kept (in memory and in ``best.pt``) and are the
result; ``patience`` evaluations without improvement stop the run early. A checkpoint is
written after each validation, so ``--resume`` continues from the last one and reaches the
same weights as an uninterrupted run. Parameters and optimizer state are read and written
through :mod:`layerfuse.recover.sharding`, whole on disk whatever the parallelism.
"""

from __future__ import annotations

__all__ = ["TrainResult", "Trainer"]

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerfuse.errors import LayerfuseError
from layerfuse.progress import SILENT, Reporter
from layerfuse.recover.budget import CpuClock
from layerfuse.recover.checkpoint import load_state, restore_random, save_state, snapshot_random
from layerfuse.recover.data import TrainingData
from layerfuse.recover.distributed import Distributed
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.objectives import Objective
from layerfuse.recover.settings import TrainSettings
from layerfuse.recover.sharding import (
    full_params,
    gather_optimizer,
    load_params,
    local_params,
    restore_local,
    shard_optimizer,
)
from layerfuse.recover.teacher import Teacher
from layerfuse.recover.validation import Validator


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_score: float | None = None
    steps_done: int = 0
    tokens_seen: int = 0
    stopped_early: bool = False
    finished: bool = False
    metric: str = ""
    stopped_by_budget: bool = False
    cpu_minutes: float = 0.0  # setup + local + KD, see layerfuse.recover.budget
    last_lr: float | None = None  # the rate of the last step taken
    setup_cpu_minutes: float = 0.0
    local_cpu_minutes: float = 0.0
    kd_cpu_minutes: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class Trainer:
    """Trains ``student`` (its parameters with ``requires_grad``) against ``teacher``."""

    def __init__(
        self,
        student: GraphModule,
        teacher: Teacher,
        objective: Objective,
        data: TrainingData,
        validator: Validator,
        settings: TrainSettings,
        *,
        checkpoint_dir: Path | None,
        run_key: dict,
        dist: Distributed,
        reporter: Reporter = SILENT,
    ) -> None:
        self.student, self.teacher, self.objective = student, teacher, objective
        self.data, self.validator, self.settings = data, validator, settings
        self.checkpoint_dir, self.dist, self.reporter = checkpoint_dir, dist, reporter
        self.run_key = {**run_key, "settings": settings.run_key(), "objective": asdict(objective)}
        settings.check(dist.world_size)
        self.model = dist.wrap(student, student.device)
        self.device = student.device
        self.trained = [p for p in student.weights if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trained, lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.budget_progress = 0.0  # of the budget's distillation part, the same on every process
        self._kd_at_start = 0.0  # distillation CPU-minutes charged when this process began
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: settings.learning_rate_factor(step, self.budget_progress)
        )
        self.result = TrainResult(metric=validator.metric)
        self.best: dict[str, torch.Tensor] | None = None  # this process's part of each
        self.bad_evaluations = 0

    # state -------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "run_key": self.run_key,
            "params": full_params(self.student, self.dist.is_main),
            "optimizer": gather_optimizer(self.optimizer, self.dist.is_main),
            "scheduler": self.scheduler.state_dict(),
            "random": snapshot_random(),
            "result": self.result.to_json(),
            "bad_evaluations": self.bad_evaluations,
        }

    _state_keys = ("run_key", "params", "optimizer", "scheduler", "random", "result")
    _state_keys += ("bad_evaluations",)

    def _save(self, name: str, state: dict) -> None:
        if self.checkpoint_dir is not None and self.dist.is_main:
            save_state(self.checkpoint_dir / name, state)
        self.dist.barrier()

    def resume(self) -> None:
        """Continue from ``state.pt`` in the checkpoint folder."""
        if self.checkpoint_dir is None:
            raise LayerfuseError("--resume needs --checkpoint-dir")
        state = load_state(self.checkpoint_dir / "state.pt", self._state_keys)
        if state["run_key"] != self.run_key:
            changed = sorted(k for k in self.run_key if state["run_key"].get(k) != self.run_key[k])
            raise LayerfuseError(
                f"{self.checkpoint_dir}: the checkpoint was made by a run with other "
                f"{', '.join(changed)}; resume with the same models and options"
            )
        load_params(self.student, state["params"])
        self.optimizer.load_state_dict(shard_optimizer(state["optimizer"], self.trained))
        self.scheduler.load_state_dict(state["scheduler"])
        restore_random(state["random"])
        self.result = TrainResult(**state["result"])
        self.bad_evaluations = state["bad_evaluations"]
        if self.result.best_step is not None:
            best = load_state(self.checkpoint_dir / "best.pt")["params"]
            self.best = local_params(self.student, best)

    # loop --------------------------------------------------------------------------------

    def _micro_batches(self, step: int) -> list[np.ndarray]:
        s = self.settings
        indices = self.data.step_indices(step, s.global_batch, s.seed)
        return [indices[i : i + s.batch_size] for i in range(0, len(indices), s.batch_size)]

    def _micro_step(self, rows: np.ndarray, terms: int, sync: bool) -> float:
        batch = self.data.batch(rows[self.dist.shard(len(rows))])
        feeds = self.teacher.feeds(batch.feeds)
        teacher_out, teacher_taps = None, {}
        if self.objective.uses_teacher:
            out, tapped = self.teacher.run(feeds)
            teacher_out = torch.from_numpy(out).to(self.device)
            teacher_taps = {k: torch.from_numpy(v).to(self.device) for k, v in tapped.items()}
        inputs = {n: torch.from_numpy(feeds[n]).to(self.device) for n in self.student.input_names}
        mask = torch.from_numpy(batch.mask).to(self.device)
        autocast = torch.autocast(
            self.device.type, torch.bfloat16, enabled=self.settings.precision == "bf16"
        )
        with self.dist.accumulating(self.model, sync):
            with autocast:
                outputs, taps = self.model(inputs, self.objective.student_taps)
            loss = self.objective.loss_sum(
                outputs[0].float(), {k: v.float() for k, v in taps.items()}, teacher_out,
                teacher_taps, inputs["input_ids"], mask,
            )  # fmt: skip
            loss = loss * self.dist.world_size / terms
            loss.backward()
        return float(loss.detach()) / self.dist.world_size

    def _train_step(self, step: int, first: int, clock: CpuClock) -> tuple[float, int]:
        """One optimizer step; ``first``: this process's first step (for the step cost)."""
        micro = self._micro_batches(step)
        masks = [self.data.batch(rows).mask for rows in micro]
        terms = sum(self.objective.term_count(mask) for mask in masks)
        self.optimizer.zero_grad(set_to_none=True)
        self.student.train()
        loss = sum(
            self._micro_step(rows, terms, sync=i == len(micro) - 1) for i, rows in enumerate(micro)
        )
        if self.settings.clip > 0:  # of the global norm, sharded gradients (DTensors) included
            torch.nn.utils.clip_grad_norm_(self.trained, self.settings.clip)
        self.optimizer.step()
        clock.charge()
        if self.settings.fits_budget:
            self.budget_progress = self._budget_progress(step + 1 - first)
        self.scheduler.step()
        return self.dist.sum([loss])[0], int(sum(mask.sum() for mask in masks))

    def _evaluate(self, step: int, train_loss: float | None) -> bool:
        """Validate, keep the best parameters, checkpoint; True when patience ran out."""
        score = self.dist.from_main(self.validator.score(self.student, self.dist.scoring))
        self.dist.after_forward(self.model)
        self.result.history.append({"step": step, "train_loss": train_loss, "valid": score})
        if self.result.best_score is None or score < self.result.best_score:
            self.result.best_score, self.result.best_step = score, step
            self.bad_evaluations = 0
            self.best = local_params(self.student)
            params = full_params(self.student, self.dist.is_main)
            self._save("best.pt", {"step": step, "params": params})
        else:
            self.bad_evaluations += 1
        self.reporter.step(f"step {step}: valid {self.validator.metric} {score:.4g}")
        patience = self.settings.patience
        return bool(patience) and self.bad_evaluations >= patience

    def _budget_progress(self, steps_here: int = 0) -> float:
        """Where the budget's distillation part will stand when the next step ends (this
        process's mean step cost added), averaged over processes so all use one rate."""
        r = self.result
        left = self.settings.budget_minutes - r.setup_cpu_minutes - r.local_cpu_minutes
        step_cost = (r.kd_cpu_minutes - self._kd_at_start) / steps_here if steps_here else 0.0
        mine = (r.kd_cpu_minutes + step_cost) / left if left > 0 else 1.0
        return self.dist.sum([mine])[0] / self.dist.world_size

    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Train to ``steps`` (or early stop); ``stop_after`` ends this process at that step
        with a checkpoint, to be continued with :meth:`resume`."""
        s, result = self.settings, self.result
        if not result.history and s.eval_every:
            self._evaluate(0, None)
            self._save("state.pt", self._state())
        started, window_loss, window_tokens = time.perf_counter(), [], 0
        steps, clock = range(result.steps_done, s.steps), CpuClock(result)
        result.stopped_by_budget = False
        self._kd_at_start = result.kd_cpu_minutes
        if s.fits_budget:
            self.budget_progress = self._budget_progress()
        # A budget ends the run long before a step cap: no step count to estimate time from.
        total = None if s.budget_minutes else len(steps)
        for step in self.reporter.track(steps, total, "recovering"):
            if stop_after is not None and step >= stop_after:
                self._save("state.pt", self._state())
                return result
            if self.dist.sum([float(clock.spent(s.budget_minutes))])[0]:
                result.stopped_by_budget = True
                self.reporter.step(f"CPU budget spent: {result.cpu_minutes:.2f} CPU-minutes")
                self._save("state.pt", self._state())
                break
            result.last_lr = float(self.scheduler.get_last_lr()[0])
            loss, tokens = self._train_step(step, steps.start, clock)
            result.steps_done, result.tokens_seen = step + 1, result.tokens_seen + tokens
            window_loss.append(loss)
            window_tokens += tokens
            done = step + 1
            if done % 10 == 0 or done == s.steps:
                elapsed = time.perf_counter() - started
                if s.budget_minutes:
                    budget_left = max(0.0, s.budget_minutes - result.cpu_minutes)
                    left, of = f"{budget_left:.1f} CPU-min of the budget left", ""
                else:
                    remaining = elapsed / (done - steps.start) * (s.steps - done) / 60
                    left, of = f"ETA {remaining:.1f} min", f"/{s.steps}"
                self.reporter.step(
                    f"step {done}{of}: loss {np.mean(window_loss):.4g}, lr "
                    f"{result.last_lr:.3g}, {window_tokens / elapsed:.0f} tokens/s, {left}"
                )
            if s.eval_every and (done % s.eval_every == 0 or done == s.steps):
                stop = self._evaluate(done, float(np.mean(window_loss)))
                window_loss = []
                clock.skip()
                self._save("state.pt", self._state())
                clock.charge()
                if stop:
                    result.stopped_early = True
                    break
        result.finished = True
        if self.best is not None:
            restore_local(self.student, self.best)
        return result
