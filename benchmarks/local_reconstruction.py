"""Local reconstruction as recovery's first stage, measured per CPU-minute (issue 25).

SmolLM2-135M with a third of its FFs tied by permutation (``layerfuse merge --blocks 20-29
--method permute``, and other ``--windows``), test perplexity (merge_quality's measure, 4k
test tokens) of:

- merged: the graph as merged;
- merged + local: only the local stage (``--local-steps``, inputs from the original model);
- merged + local (sequential inputs): the same, its second half of steps on the FF inputs
  the compressed model produces (``--local-inputs sequential``);
- merged + KD: global distillation alone (KL to the original's logits, all weights) for a
  fixed number of steps;
- merged + local + KD: the local stage, then distillation for as many steps as fit in the
  CPU time the KD-only arm used (its measured CPU seconds per step), so both arms get the
  same total CPU time;
- merged + KD (CPU of local + KD): distillation alone for the CPU time the local + KD arm
  really used (the split above is made before that arm runs, and contention moves it).

CPU time is the process's user+system time (every thread, onnxruntime's included), so it
stays comparable when other jobs share the 2 cores; wall time and the load average are
recorded too. Each arm is saved as it finishes; run the same command again to continue.

    python benchmarks/local_reconstruction.py                # about 30 minutes on 2 CPU cores
    python benchmarks/local_reconstruction.py --windows 20-29,16-26
    python benchmarks/local_reconstruction.py --kd-steps 2 --local-steps 5 --tag smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import merge_quality
from common import WORK, exported_model, log, markdown_table, notes_section, write_results

from layerfuse.data.batches import make_batches
from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.progress import ConsoleReporter
from layerfuse.recover.data import load_training_data
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.local import LocalSettings, reconstruct
from layerfuse.recover.run import RecoverRequest, recover
from layerfuse.recover.settings import TrainSettings
from layerfuse.recover.writeback import write_back

MODEL = "smollm2-135m"
TEST_TOKENS = 4096
# Distillation as benchmarks/recovery.py runs it, with 128-token rows; no validation (it
# would cost CPU time the arms are compared on), the last step is the result.
KD = TrainSettings(
    steps=24, batch_size=4, grad_accum=1, seq_len=128, lr=2e-4, warmup=2,
    eval_every=0, patience=0, valid_tokens=512, seed=0,
)  # fmt: skip
LOCAL = LocalSettings()


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def merged_model(original: Path, window: tuple[int, int]) -> Path:
    path = WORK / "local_reconstruction" / f"merged-{window[0]}-{window[1]}" / "model.onnx"
    if not path.exists():
        log(f"merging FFs {window[0]}-{window[1]} (permute)")
        plan = plan_merge(original, MergeRequest(ranges=[window], method="permute"))
        save_model(apply_plan(original, plan), path)
        carry_manifest(original, path)
    return path


def measured(run) -> tuple[dict, dict]:
    """``run()``'s result and its CPU seconds, wall seconds and load averages."""
    load_before, cpu, wall = os.getloadavg(), cpu_seconds(), time.perf_counter()
    result = run()
    cost = {
        "cpu_seconds": cpu_seconds() - cpu,
        "wall_seconds": time.perf_counter() - wall,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }
    return result, cost


def local_only(original: Path, merged: Path, out: Path, local: LocalSettings) -> dict:
    """The local stage alone, written back like recover writes its result."""
    student = GraphModule(load_model(merged))
    data = load_training_data(original, "fortunes", "train", seq_len=KD.seq_len)
    summary = reconstruct(
        original, load_model(original), load_model(merged), student, data, local, ConsoleReporter()
    )
    feeds = make_batches(original, "fortunes", "valid", tokens=256, seq_len=64)[0].feeds
    verify = {k: v[:2] for k, v in feeds.items()}
    write_back(merged, student, out, verify_feeds=verify, summary={"local": local.steps})
    return {"local": summary, "tokens": 0}


def distilled(original: Path, merged: Path, out: Path, kd: TrainSettings, local) -> dict:
    request = RecoverRequest(original, merged, out, settings=kd, local=local)
    summary = recover(request, ConsoleReporter())
    return {"local": summary["local"], "tokens": summary["tokens_seen"], "kd_steps": kd.steps}


def run_arm(name: str, original: Path, merged: Path, folder: Path, rows: list, args) -> dict:
    slug = name.replace(" + ", "+").replace(" ", "_").replace("(", "").replace(")", "")
    out = folder / slug / "model.onnx"
    local = replace(LOCAL, steps=args.local_steps)
    kd = replace(KD, steps=args.kd_steps)
    if name == "merged":
        result, cost = {"tokens": 0}, {"cpu_seconds": 0.0, "wall_seconds": 0.0}
        out = merged
    elif name == "merged + local":
        result, cost = measured(lambda: local_only(original, merged, out, local))
    elif name == "merged + local (sequential inputs)":
        sequential = replace(local, inputs="sequential")
        result, cost = measured(lambda: local_only(original, merged, out, sequential))
    elif name == "merged + KD":
        result, cost = measured(
            lambda: distilled(original, merged, out, kd, replace(local, steps=0))
        )
    elif name == "merged + KD (CPU of local + KD)":
        kd_row = next(r for r in rows if r["arm"] == "merged + KD")
        both = next(r for r in rows if r["arm"] == "merged + local + KD")
        steps = round(kd.steps * both["cpu_seconds"] / kd_row["cpu_seconds"])
        no_local = replace(local, steps=0)
        result, cost = measured(
            lambda: distilled(original, merged, out, replace(kd, steps=steps), no_local)
        )
    else:
        kd_row = next(r for r in rows if r["arm"] == "merged + KD")
        local_row = next(r for r in rows if r["arm"] == "merged + local")
        per_step = kd_row["cpu_seconds"] / kd.steps
        steps = max(1, round((kd_row["cpu_seconds"] - local_row["cpu_seconds"]) / per_step))
        result, cost = measured(
            lambda: distilled(original, merged, out, replace(kd, steps=steps), local)
        )
    _, value = merge_quality.quality(out, TEST_TOKENS)
    log(f"{name}: test perplexity {value:.4g}, {cost['cpu_seconds'] / 60:.1f} CPU-minutes")
    return {"arm": name, "perplexity": value, **cost, **result}


ARMS = [
    "merged",
    "merged + local",
    "merged + KD",
    "merged + local + KD",
    "merged + local (sequential inputs)",
    "merged + KD (CPU of local + KD)",
]


def _load(row: dict) -> str:
    if "load_before" not in row:
        return "-"
    return f"{row['load_before'][0]:.1f}/{row['load_after'][0]:.1f}"


def markdown(windows: dict[str, list[dict]], original_ppl: float, params: dict) -> str:
    out = ["# Local reconstruction before distillation (SmolLM2-135M, FFs tied by permutation)\n\n"]
    out.append(
        f"Original test perplexity {original_ppl:.4g} ({TEST_TOKENS} test tokens of fortunes). "
        "CPU min: user+system time of the process (all threads) on 2 cores shared with other "
        "jobs; the local + KD arm gets as many KD steps as fit in the KD arm's CPU time after "
        "its local stage.\n"
    )
    headers = ["arm", "test ppl", "vs original", "CPU min", "wall min", "KD steps"]
    headers += ["KD tokens", "local rel. error (held out)", "load 1-min before/after"]
    for window, rows in windows.items():
        removed = 100 * (1 - params[window] / params["original"])
        out.append(
            f"\n## FFs {window} tied ({params[window] / 1e6:.2f}M of "
            f"{params['original'] / 1e6:.2f}M parameters, {removed:.1f}% removed)\n\n"
        )
        out.append(markdown_table(headers, [_cells(r, original_ppl) for r in rows]))
    return "".join(out)


def _cells(r: dict, original_ppl: float) -> list:
    sets = r.get("local", {}).get("sets", [])
    error = (
        f"{sets[0]['relative_error_before']:.3f} -> {sets[0]['relative_error_after']:.3f}"
        if sets
        else "-"
    )
    return [
        r["arm"], f"{r['perplexity']:.4g}", f"{r['perplexity'] / original_ppl:.2f}x",
        f"{r['cpu_seconds'] / 60:.1f}", f"{r['wall_seconds'] / 60:.1f}",
        r.get("kd_steps", "-"), f"{r['tokens']:,}", error, _load(r),
    ]  # fmt: skip


def _window(text: str) -> tuple[int, int]:
    first, last = text.split("-")
    return int(first), int(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="20-29", help="comma-separated FF windows")
    parser.add_argument("--kd-steps", type=int, default=KD.steps)
    parser.add_argument("--local-steps", type=int, default=LOCAL.steps)
    parser.add_argument("--tag", default="full")
    parser.add_argument(
        "--notes", type=Path, help="a Markdown file of notes (default: keep the results' own)"
    )
    parser.add_argument(
        "--write-only", action="store_true", help="write the results of the arms already run"
    )
    args = parser.parse_args()
    original = exported_model(MODEL)
    folder = WORK / "local_reconstruction" / args.tag
    partial = folder / "partial.json"
    folder.mkdir(parents=True, exist_ok=True)
    state = json.loads(partial.read_text()) if partial.exists() else {"windows": {}}
    if "original_perplexity" not in state:
        state["original_perplexity"] = merge_quality.quality(original, TEST_TOKENS)[1]
    params = {"original": parameter_count(load_model(original))}
    for window in args.windows.split(","):
        merged = merged_model(original, _window(window))
        params[window] = parameter_count(load_model(merged))
        rows = state["windows"].setdefault(window, [])
        for name in [] if args.write_only else ARMS:
            if not any(r["arm"] == name for r in rows):
                rows.append(run_arm(name, original, merged, folder / window, rows, args))
                partial.write_text(json.dumps(state, indent=1))
    if args.tag != "full":
        return
    payload = {
        "model": MODEL,
        "method": "permute",
        "test_tokens": TEST_TOKENS,
        "kd": asdict(replace(KD, steps=args.kd_steps)),
        "local": asdict(replace(LOCAL, steps=args.local_steps)),
        "parameters": params,
        "original_perplexity": state["original_perplexity"],
        "windows": state["windows"],
    }
    text = markdown(state["windows"], state["original_perplexity"], params)
    write_results(
        "local_reconstruction", payload, text + notes_section("local_reconstruction", args.notes)
    )


if __name__ == "__main__":
    main()
