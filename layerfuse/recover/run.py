"""``recover``: check the inputs, train the optimized graph against the original, write it.

Everything the user can get wrong is checked before the first training step (provenance,
plan, data, output folder, device), so a mistake costs seconds, not an hour of training.
Training has two stages: local reconstruction (:mod:`layerfuse.recover.local`: each tied FF
set fitted to its blocks' original FF outputs, cheap, where the damage is), whose result is
the student's starting weights, then global distillation (:mod:`layerfuse.recover.trainer`),
which a CPU-time budget can end (:mod:`layerfuse.recover.budget`), data parallel over the
processes of a launcher, replicated (DDP) or sharded (FSDP, :mod:`layerfuse.recover.sharding`).
"""

from __future__ import annotations

__all__ = ["RecoverRequest", "recover"]

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerfuse.data.batches import make_batches
from layerfuse.errors import LayerfuseError
from layerfuse.files import check_writable, refuse_overwriting_inputs, write_json_atomic
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model
from layerfuse.model.manifest import require_manifest
from layerfuse.model.publish import model_files
from layerfuse.progress import SILENT, Reporter
from layerfuse.recover.budget import CpuClock, cpu_seconds
from layerfuse.recover.data import TrainingData, load_training_data
from layerfuse.recover.distributed import Distributed, from_environment
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.local import LocalSettings, reconstruct
from layerfuse.recover.mapping import map_blocks
from layerfuse.recover.objectives import Objective
from layerfuse.recover.provenance import check_derived, load_any_plan
from layerfuse.recover.settings import TrainSettings
from layerfuse.recover.sharding import block_boundaries, full_params, load_params
from layerfuse.recover.teacher import Teacher
from layerfuse.recover.trainer import Trainer
from layerfuse.recover.validation import Validator
from layerfuse.recover.writeback import write_back

TRAIN_CHOICES = ("all", "touched")


@dataclass
class RecoverRequest:
    original: Path
    optimized: Path
    output: Path
    data: str = "fortunes"
    objective: str = "kd"
    temperature: float = 1.0
    hidden_weight: float = 1.0
    train: str = "all"
    plan: Path | None = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    checkpoint_dir: Path | None = None
    resume: bool = False
    stop_after: int | None = None
    device: str = "cpu"
    parallel: str = "ddp"


def _check_output(request: RecoverRequest) -> None:
    output = request.output
    if output.suffix != ".onnx":
        raise LayerfuseError(f"output {output} must be an .onnx file")
    check_writable(output)
    inputs = model_files(request.original) + model_files(request.optimized)
    refuse_overwriting_inputs(inputs, [output])


def _device(name: str, local_rank: int) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LayerfuseError("--device cuda: this torch build sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise LayerfuseError(f"unknown device '{name}' (choose cpu or cuda)")
    return torch.device("cpu")


def _distributed(request: RecoverRequest, reporter: Reporter) -> Distributed:
    """The launcher's processes; ``fsdp`` in one process is plain training, said so."""
    dist = from_environment(request.device, request.parallel)
    if request.parallel == "fsdp" and not dist.active:
        reporter.step("--parallel fsdp in one process: nothing to shard, training unsharded")
    return dist


def _student(request: RecoverRequest, original, optimized, plan, dist) -> tuple[GraphModule, list]:
    """The student, with only the chosen parameters trainable, split into one unit per block
    when it is to be sharded, and hidden-state pairs."""
    needs_map = request.train == "touched" or request.objective == "kd+hidden"
    block_map = map_blocks(original, optimized, plan) if needs_map else None
    student = GraphModule(optimized)
    if request.train == "touched":
        for name, parameter in student.named_weights().items():
            parameter.requires_grad_(name in block_map.touched_initializers)
    if not any(p.requires_grad for p in student.weights):
        raise LayerfuseError("no trainable weights: the graph has no linear, norm or embedding")
    if dist.sharded:
        student.partition(block_boundaries(optimized))
    return student, [] if block_map is None else block_map.hidden_pairs


def _data(request: RecoverRequest, reporter: Reporter) -> tuple[TrainingData, list]:
    """Training rows (checked to hold one global batch) and validation batches."""
    settings = request.settings
    reporter.step("reading training text")
    data = load_training_data(request.original, request.data, "train", seq_len=settings.seq_len)
    data.step_indices(0, settings.global_batch, settings.seed)
    valid = make_batches(
        request.original,
        request.data,
        "valid",
        tokens=settings.valid_tokens,
        seq_len=settings.seq_len,
        batch_size=settings.batch_size,
    )
    return data, valid


def _teacher(request: RecoverRequest, objective: Objective, dist: Distributed) -> Teacher:
    """The original in onnxruntime; a distributed run shares each machine's cores among the
    processes on it."""
    provider = "cpu" if request.device == "cpu" else "auto"
    threads = max(1, (os.cpu_count() or 1) // dist.local_world_size) if dist.active else None
    return Teacher(request.original, objective.teacher_taps, provider=provider, threads=threads)


def _local(request: RecoverRequest, models, student, data, dist, reporter: Reporter) -> dict:
    """Local reconstruction into the student's weights, before the trainer exists.

    Its result is part of the weights every checkpoint holds, so a resumed run does not
    redo it (the run key holds its settings, so a resume with others is refused); its
    summary is kept beside the checkpoints for the resumed run's report.
    """
    record = None if request.checkpoint_dir is None else request.checkpoint_dir / "local.json"
    if request.resume:
        if record is not None and record.is_file():
            return json.loads(record.read_text())
        return {"steps": request.local.steps, "sets": [], "notes": ["resumed; summary not kept"]}
    local = request.local.for_task(require_manifest(request.original).task)
    if local.steps != request.local.steps:
        note = "skipped on an encoder (--local-encoders run to run it)"
        reporter.step(f"local reconstruction: {note}")
        return {"steps": 0, "inputs": local.inputs, "sets": [], "notes": [note]}
    summary = reconstruct(request.original, *models, student, data, local, reporter)
    if record is not None and dist.is_main:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, summary)
    return summary


def _trained_student(trainer: Trainer, optimized, dist: Distributed) -> GraphModule | None:
    """Process 0's student with the trained weights whole, for write-back (None elsewhere):
    the trainer's own, or under FSDP an unsharded copy built on process 0, since a forward
    of the sharded one is collective. Every process calls this (the gathering is collective).
    """
    if not dist.sharded:
        return trainer.student
    weights = full_params(trainer.student, dist.is_main)
    if not dist.is_main:
        return None
    student = GraphModule(optimized, trainable=set(weights))
    load_params(student, weights)
    return student


def _finish(request: RecoverRequest, optimized, trainer: Trainer, result, data, valid, dist, local):
    """The summary; process 0 writes the trained weights into the optimized graph."""
    summary = {
        **result.to_json(),
        "local": local,
        "objective": request.objective,
        "train": request.train,
        "trained_parameters": int(sum(p.numel() for p in trainer.trained)),
        "training_rows": len(data),
        "training_tokens_available": data.tokens,
        "output": str(request.output),
    }
    student = _trained_student(trainer, optimized, dist) if result.finished else None
    if student is not None and dist.is_main:
        verify = {k: v[:2] for k, v in valid[0].feeds.items()}
        record = {k: summary[k] for k in ("objective", "train", "steps_done", "tokens_seen")}
        summary["verified_max_abs_diff"] = write_back(
            request.optimized, student, request.output, verify_feeds=verify, summary=record
        )
    dist.barrier()
    dist.close()
    return summary


def recover(request: RecoverRequest, reporter: Reporter = SILENT) -> dict:
    """Train, write ``request.output``; a summary (``finished`` False if stopped early)."""
    settings, started = request.settings, cpu_seconds()
    if request.train not in TRAIN_CHOICES:
        raise LayerfuseError(f"unknown --train '{request.train}' (choose all or touched)")
    _check_output(request)
    request.local.check()
    dist = _distributed(request, reporter)
    settings.check(dist.world_size)
    original, optimized = load_model(request.original), load_model(request.optimized)
    source = check_derived(original, optimized)
    plan = load_any_plan(request.plan, original, optimized) if request.plan else None
    task = require_manifest(request.original).task
    device = _device(request.device, dist.local_rank)
    torch.manual_seed(settings.seed)
    student, pairs = _student(request, original, optimized, plan, dist)
    objective = Objective(
        request.objective, task, request.temperature, request.hidden_weight, pairs
    )
    data, valid = _data(request, reporter)
    teacher = _teacher(request, objective, dist)
    student.to(device)
    trained = sorted(n for n, p in student.named_weights().items() if p.requires_grad)
    run_key = {
        "source": source,
        "optimized": fingerprint(optimized),
        "data": request.data,
        "trained": trained,
        "local": request.local.for_task(task).run_key(),
    }
    local_started = cpu_seconds()
    local = _local(request, (original, optimized), student, data, dist, reporter)
    local_seconds = cpu_seconds() - local_started
    trainer = Trainer(
        student,
        teacher,
        objective,
        data,
        Validator(valid, teacher, task),
        settings,
        checkpoint_dir=request.checkpoint_dir,
        run_key=run_key,
        dist=dist,
        reporter=reporter,
    )
    if request.resume:
        trainer.resume()
    else:
        CpuClock.start(trainer.result, local_started - started, local_seconds)
    result = trainer.run(stop_after=request.stop_after)
    return _finish(request, optimized, trainer, result, data, valid, dist, local)
