"""``layerfuse recover``: train an optimized graph back toward its original, in place.

First, for a merged model, local reconstruction (``--local-steps``, on by default) fits each
tied FF to the FF outputs of the original blocks it replaced, in a few minutes; then global
distillation trains the whole graph from there.
The defaults (100 steps of 4 x 2 x 128 tokens, validation every 25 steps) finish
SmolLM2-135M on 2 CPU cores in tens of minutes. Under ``torchrun --nproc_per_node N -m
layerfuse recover ...`` or ``accelerate launch -m layerfuse recover ...`` the same command
trains with DistributedDataParallel; the global batch (``--batch-size`` x ``--grad-accum``)
and so the result stay the same.
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json
import shutil
from pathlib import Path

from layerfuse.cli.common import console, model_file, positive_float, positive_int
from layerfuse.progress import ConsoleReporter

DATA_HELP = (
    "training text: fortunes (its train split, disjoint from calib/valid/test; the default), "
    "a .txt file (paragraphs), a .jsonl file ({'text': ...} a line) or a datasets "
    "save_to_disk folder"
)


def _run(args: argparse.Namespace) -> int:
    from layerfuse.recover.local import LocalSettings
    from layerfuse.recover.run import RecoverRequest, recover
    from layerfuse.recover.trainer import TrainSettings

    output = Path(args.output)
    default_checkpoints = args.checkpoint_dir is None
    checkpoints = output.with_suffix(".recover") if default_checkpoints else args.checkpoint_dir
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        patience=args.patience,
        valid_tokens=args.valid_tokens,
        seed=args.seed,
    )
    request = RecoverRequest(
        original=Path(args.original),
        optimized=Path(args.optimized),
        output=output,
        data=args.data,
        objective=args.objective,
        temperature=args.temperature,
        hidden_weight=args.hidden_weight,
        train=args.train,
        plan=Path(args.plan) if args.plan else None,
        settings=settings,
        local=LocalSettings(
            steps=args.local_steps,
            cache_tokens=args.local_tokens,
            lr=args.local_lr,
            seed=args.seed,
            inputs=args.local_inputs,
        ),
        checkpoint_dir=Path(checkpoints),
        resume=args.resume,
        stop_after=args.stop_after,
        device=args.device,
    )
    summary = recover(request, ConsoleReporter())
    if summary["finished"] and default_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    _describe(summary, checkpoints)
    return 0


def _describe_local(local: dict) -> str:
    """One line for the local stage: each tied set's held-out relative error, or why none."""
    if not local["sets"]:
        return "local: " + "; ".join(local["notes"])
    fits = ", ".join(
        f"blocks {s['blocks'][0]}-{s['blocks'][-1]} relative error "
        f"{s['relative_error_before']:.3g} -> {s['relative_error_after']:.3g}"
        for s in local["sets"]
    )
    return f"local reconstruction ({local['steps']} steps, {local['seconds']:.0f} s): {fits}"


def _describe(summary: dict, checkpoints: Path) -> None:
    out = console()
    out.print(_describe_local(summary["local"]))
    if not summary["finished"]:
        out.print(
            f"stopped after step {summary['steps_done']}; continue with --resume "
            f"(checkpoint in {checkpoints})"
        )
        return
    history = summary["history"]
    metric = summary["metric"].replace("_", " ")
    line = f"trained {summary['trained_parameters']:,} parameters for {summary['steps_done']} "
    line += f"steps ({summary['tokens_seen']:,} tokens)"
    if history:
        line += (
            f"; valid {metric} {history[0]['valid']:.4g} -> {summary['best_score']:.4g} "
            f"(best at step {summary['best_step']})"
        )
    out.print(line + ("; stopped early" if summary["stopped_early"] else ""))
    out.print(
        f"wrote {summary['output']} (onnxruntime matches the trained weights: "
        f"max |diff| {summary['verified_max_abs_diff']:.2g})"
    )


def _options(parser: argparse.ArgumentParser) -> None:
    from layerfuse.recover.trainer import TrainSettings as D

    add = parser.add_argument
    add("--data", default="fortunes", help=DATA_HELP)
    add("--steps", type=positive_int, default=D.steps, help=f"optimizer steps (default {D.steps})")
    add(
        "--batch-size",
        type=positive_int,
        default=D.batch_size,
        help=f"sequences per micro-batch, shared out over processes (default {D.batch_size})",
    )
    add(
        "--grad-accum",
        type=positive_int,
        default=D.grad_accum,
        help=f"micro-batches accumulated per optimizer step (default {D.grad_accum})",
    )
    add(
        "--seq-len",
        type=positive_int,
        default=D.seq_len,
        help=f"tokens per sequence (default {D.seq_len})",
    )
    add(
        "--lr",
        type=positive_float,
        default=D.lr,
        help=f"peak AdamW learning rate (default {D.lr:g})",
    )
    add(
        "--warmup",
        type=int,
        default=D.warmup,
        help=f"linear warm-up steps, then cosine decay to 10%% (default {D.warmup})",
    )
    add(
        "--weight-decay",
        type=float,
        default=D.weight_decay,
        help=f"AdamW weight decay (default {D.weight_decay:g})",
    )


def _objective_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--objective",
        default="kd",
        choices=["kd", "lm", "kd+hidden"],
        help="kd: KL to the original's logits (encoders: its last_hidden_state; the default); "
        "lm: next-token loss on the text; kd+hidden: kd plus the residual stream after every "
        "block both graphs share",
    )
    add(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="softmax temperature of kd (default 1)",
    )
    add("--hidden-weight", type=float, default=1.0, help="weight of the hidden term of kd+hidden")
    add(
        "--train",
        default="all",
        choices=["all", "touched"],
        help="all weights (default), or only those of the merged/fused/pruned blocks, their "
        "neighbours and the weights the rewrite created",
    )
    add("--plan", help="the plan OPTIMIZED was made with (checked; adds its blocks to touched)")


def _local_options(parser: argparse.ArgumentParser) -> None:
    from layerfuse.recover.local import LocalSettings as D

    add = parser.add_argument
    add(
        "--local-steps",
        type=int,
        default=D.steps,
        help="first stage: Adam steps fitting each tied FF set to its blocks' original FF "
        f"outputs on cached activations, before distillation; 0 turns it off (default {D.steps})",
    )
    add(
        "--local-tokens",
        type=positive_int,
        default=D.cache_tokens,
        help=f"training tokens cached per tied block for that fit (default {D.cache_tokens})",
    )
    add(
        "--local-lr",
        type=positive_float,
        default=D.lr,
        help=f"Adam learning rate of that fit (default {D.lr:g})",
    )
    add(
        "--local-inputs",
        default=D.inputs,
        choices=["original", "sequential"],
        help="FF inputs of that fit: the original model's, or after half the steps those the "
        f"compressed model produces (as GPTQ does) (default {D.inputs})",
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    from layerfuse.recover.trainer import TrainSettings as D

    add = parser.add_argument
    add(
        "--eval-every",
        type=int,
        default=D.eval_every,
        help=f"validate every N steps, 0 never; the best is kept (default {D.eval_every})",
    )
    add(
        "--patience",
        type=int,
        default=D.patience,
        help=f"stop after N validations without improvement, 0 never (default {D.patience})",
    )
    add(
        "--valid-tokens",
        type=int,
        default=D.valid_tokens,
        help=f"tokens of the valid split to validate on (default {D.valid_tokens})",
    )
    add("--checkpoint-dir", help="checkpoint folder (default OUTPUT.recover, removed when done)")
    add("--resume", action="store_true", help="continue from the last checkpoint")
    add(
        "--stop-after",
        type=positive_int,
        help="stop at this step with a checkpoint, to --resume later",
    )
    add("--seed", type=int, default=D.seed, help=f"seed of the data order (default {D.seed})")
    add("--device", default="cpu", choices=["cpu", "cuda"], help="torch device of the student")
    add("--json", action="store_true", help="print the summary as JSON")


def register(commands) -> None:
    parser = commands.add_parser(
        "recover",
        help="distil an optimized graph from its original and write the trained weights in",
        description="Train OPTIMIZED (a merged, pruned or fused graph) to match ORIGINAL and "
        "write the trained weights into a copy of OPTIMIZED's graph, ties and all.",
    )
    parser.add_argument("original", type=model_file, help="the original .onnx (the teacher)")
    parser.add_argument(
        "optimized", type=model_file, help="the .onnx layerfuse merged, pruned or fused from it"
    )
    parser.add_argument("-o", "--output", required=True, help="the recovered model (.onnx)")
    _options(parser)
    _objective_options(parser)
    _local_options(parser)
    _run_options(parser)
    parser.set_defaults(handler=_run)
