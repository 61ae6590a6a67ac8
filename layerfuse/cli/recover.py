"""``layerfuse recover``: train an optimized graph back toward its original, in place.

First, for a merged model, local reconstruction (``--local-steps``, on by default) fits each
tied FF to the FF outputs of the original blocks it replaced, in a few minutes; then global
distillation trains the whole graph from there.
The defaults (100 steps of 4 x 2 x 128 tokens, validation every 25 steps) finish
SmolLM2-135M on 2 CPU cores in tens of minutes. Under ``torchrun --nproc_per_node N -m
layerfuse recover ...`` or ``accelerate launch -m layerfuse recover ...`` the same command
trains with DistributedDataParallel, or with ``--parallel fsdp`` sharded over the processes
(FSDP); the global batch (``--batch-size`` x ``--grad-accum``) and so the result stay the same.
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json
import shutil
from pathlib import Path

from layerfuse.cli.common import console, model_file, positive_float, positive_int
from layerfuse.cli.settings import add_settings_options, settings_from_args
from layerfuse.progress import ConsoleReporter

DATA_HELP = (
    "training text: fortunes (its train split, disjoint from calib/valid/test; the default), "
    "a .txt file (paragraphs), a .jsonl file ({'text': ...} a line) or a datasets "
    "save_to_disk folder"
)


def _run(args: argparse.Namespace) -> int:
    from layerfuse.recover.local import LocalSettings
    from layerfuse.recover.run import RecoverRequest, recover
    from layerfuse.recover.settings import TrainSettings

    output = Path(args.output)
    default_checkpoints = args.checkpoint_dir is None
    checkpoints = output.with_suffix(".recover") if default_checkpoints else args.checkpoint_dir
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
        settings=settings_from_args(TrainSettings, args),
        local=settings_from_args(LocalSettings, args, seed=args.seed),
        checkpoint_dir=Path(checkpoints),
        resume=args.resume,
        stop_after=args.stop_after,
        device=args.device,
        parallel=args.parallel,
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
    from layerfuse.recover.local import LocalSettings
    from layerfuse.recover.settings import TrainSettings

    parser.add_argument("--data", default="fortunes", help=DATA_HELP)
    add_settings_options(parser, TrainSettings)
    add_settings_options(parser, LocalSettings)


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


def _run_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--checkpoint-dir", help="checkpoint folder (default OUTPUT.recover, removed when done)")
    add("--resume", action="store_true", help="continue from the last checkpoint")
    add(
        "--stop-after",
        type=positive_int,
        help="stop at this step with a checkpoint, to --resume later",
    )
    add("--device", default="cpu", choices=["cpu", "cuda"], help="torch device of the student")
    add(
        "--parallel",
        default="ddp",
        choices=["ddp", "fsdp"],
        help="under torchrun or accelerate launch: ddp replicates the student in every process "
        "(the default); fsdp shards its weights, gradients and AdamW state over them, one "
        "transformer block at a time",
    )
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
    _run_options(parser)
    parser.set_defaults(handler=_run)
