"""The targets and the Markdown of ``benchmarks/big_models.py`` (issue 24)."""

from __future__ import annotations

from common import command_line, markdown_table

GB = 10**9
APPLY_SLACK = 1.5 * GB  # a saved plan's apply: <= the bytes it rewrites + 1.5 GB
PLANNING_SLACK = 2 * GB  # planning: <= the model's size + 2 GB
PLANNING = ("inspect", "merge plan+apply", "prune plan+apply")
APPLY = ("merge --plan apply", "prune --plan apply")


def _gib(count: float | None) -> str:
    return "-" if count is None else f"{count / (1 << 30):.2f} GiB"


def targets(runs: list[dict]) -> list[dict]:
    """One row per (model, command, target): the limit, the peak, met or not."""
    rows = []
    for run in runs:
        for row in run["commands"]:
            if "peak_rss_bytes" not in row:
                continue
            name, peak = row["command"], row["peak_rss_bytes"]
            limits = []
            if name in APPLY:
                rewritten = run.get("rewritten_bytes", 0) if name.startswith("merge") else 0
                limits.append(("apply <= rewritten + 1.5 GB", rewritten + APPLY_SLACK))
            if name in PLANNING:
                limits.append(("planning <= model + 2 GB", run["model_bytes"] + PLANNING_SLACK))
            limits.append(("below RAM, not killed", None))
            for target, limit in limits:
                met = not row["killed_by_memory_guard"] and row["returncode"] == 0
                met = met and (limit is None or peak <= limit)
                rows.append(
                    {
                        "model": run["model"],
                        "command": name,
                        "target": target,
                        "limit_bytes": limit,
                        "peak_rss_bytes": peak,
                        "met": met,
                    }
                )
    return rows


def _run_table(run: dict) -> str:
    rows = []
    for row in run["commands"]:
        if "skipped" in row:
            rows.append([row["command"], "-", "-", "-", f"skipped: {row['skipped']}"])
            continue
        note = "killed by the memory guard" if row["killed_by_memory_guard"] else ""
        if row["returncode"] and not note:
            note = f"failed (exit {row['returncode']})"
        output = _gib(row["output_bytes"]) if "output_bytes" in row else "-"
        rows.append(
            [row["command"], f"{row['wall_s']:.1f}", _gib(row["peak_rss_bytes"]), output, note]
        )
    header = f"### {run['model']}: {_gib(run['model_bytes'])} on disk\n\n"
    details = f"merge window {run['window']}, method {run['method']}"
    if "rewritten_bytes" in run:
        details += f"; the merge plan rewrites {_gib(run['rewritten_bytes'])} of FF weights"
    if "generate" in run:
        made = run["generate"]
        details += (
            f"; generated in {made['wall_s']:.0f} s at {_gib(made['peak_rss_bytes'])} peak RSS"
        )
    table = markdown_table(["command", "wall s", "peak RSS", "output", "note"], rows)
    return header + details + "\n\n" + table


def markdown(results: dict) -> str:
    target_rows = [
        [
            t["model"],
            t["command"],
            t["target"],
            _gib(t["limit_bytes"]),
            _gib(t["peak_rss_bytes"]),
            "met" if t["met"] else "NOT met",
        ]
        for t in results["targets"]
    ]
    return (
        "# Big models: every command in a fresh process, peak RSS and wall time\n\n"
        f"Regenerate: `{command_line()}`. Machine RAM {_gib(results['ram_bytes'])}, shared with "
        "other jobs while this ran (a guard kills a command when available memory runs low). "
        "Synthetic models are Llama-3-8B-shaped (hidden 4096, FF 14336, GQA 32/8, vocabulary "
        "128256, untied head) with random weights and external data, generated one weight at a "
        "time (`layerfuse.export.synthetic`); calibration uses random ids, 256 tokens of 128.\n\n"
        + "\n".join(_run_table(run) for run in results["runs"])
        + "\n## Targets (issue 24)\n\n"
        + markdown_table(["model", "command", "target", "limit", "peak RSS", ""], target_rows)
        + "\n"
        + results.get("notes", "")
    )
