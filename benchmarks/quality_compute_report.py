"""The Markdown table, the plot and the issue 25 targets (P1-P3) of ``quality_compute.py``."""

from __future__ import annotations

from pathlib import Path

from common import markdown_table

MERGES = ("permute", "vanilla", "permute (KD only)")
MERGES += tuple(f"permute + relax {rank}" for rank in (8, 32, 64))
MERGES += tuple(f"{variant} (touched)" for variant in MERGES)
PRUNES = ("prune", "prune (touched)", *(f"prune as {merge}" for merge in MERGES))


def _row(rows: list[dict], variant: str, budget: float) -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["budget"] == budget), None)


def _rows(rows: list[dict], variants: tuple[str, ...], budget: float) -> list[dict]:
    return [r for v in variants if (r := _row(rows, v, budget)) is not None]


def plot(rows: list[dict], path: Path, metric: str, title: str) -> None:
    from layerfuse.reports.plots import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        line = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["budget"])
        removed = 100 * line[0]["params_removed"]
        axis.plot(
            [r["cpu_minutes"] for r in line],
            [r[metric] for r in line],
            marker="o",
            linestyle="--" if variant in (*PRUNES, "hybrid") else "-",
            label=f"{variant} ({removed:.1f}% removed)",
        )
    original = rows[0][f"original_{metric}"]
    axis.axhline(original, color="black", linewidth=0.8, label="original")
    if metric == "perplexity":
        axis.axhline(1.3 * original, color="grey", linewidth=0.8, linestyle=":", label="1.3x (P1)")
        axis.set_yscale("log")
    axis.set_xlabel("CPU-minutes of recovery (user+system, local stage included)")
    axis.set_ylabel(f"test {metric.replace('_', ' ')}")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def _against_original(row: dict, metric: str) -> str:
    """Perplexity as a ratio to the original, accuracy as points from it."""
    original = row[f"original_{metric}"]
    if metric == "perplexity":
        return f"{row[metric] / original:.2f}x"
    return f"{100 * (row[metric] - original):+.1f} pt"


def table(rows: list[dict], metric: str) -> str:
    headers = [
        "variant",
        "net params removed",
        "budget",
        "CPU min (local + KD; setup the rest)",
        "KD steps",
    ]
    headers += ["KD tokens", f"test {metric.replace('_', ' ')}", "vs original", "load 1-min"]
    cells = []
    order = list(dict.fromkeys(r["variant"] for r in rows))
    for r in sorted(rows, key=lambda r: (order.index(r["variant"]), r["budget"])):
        load = f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}" if "load_before" in r else "-"
        cells.append([
            r["variant"], f"{100 * r['params_removed']:.1f}%", f"{r['budget']:g}",
            f"{r['cpu_minutes']:.1f} ({r['local_cpu_minutes']:.1f} + {r['kd_cpu_minutes']:.1f})",
            r.get("kd_steps", 0), f"{r['tokens']:,}", f"{r[metric]:.4g}",
            _against_original(r, metric), load,
        ])  # fmt: skip
    return markdown_table(headers, cells)


def targets(rows: list[dict]) -> list[str]:
    original = rows[0]["original_perplexity"]
    out = []
    trained = [r for r in rows if r["budget"] > 0 and r["params_removed"] >= 0.15]
    budgets = sorted({r["budget"] for r in trained})
    best = min(trained, key=lambda r: r["perplexity"]) if trained else None
    within = [r for r in trained if r["budget"] <= 30]
    met = [r for r in within if r["perplexity"] <= 1.3 * original]
    if not within:
        out.append("- **P1 not measured.**")
    else:
        best = min(within, key=lambda r: r["perplexity"])
        verdict = "met" if met else ("not met" if 30 in budgets else "not met so far")
        out.append(
            f"- **P1 ({verdict})**: some variant with >= 15% net parameters removed at <= 1.3x "
            f"the original perplexity ({1.3 * original:.4g}) within 30 CPU-minutes. Best "
            f"measured: {best['variant']}, {best['perplexity']:.4g} "
            f"({best['perplexity'] / original:.2f}x) at {best['cpu_minutes']:.1f} CPU-minutes"
            + ("" if met or 30 in budgets else " (no variant was run to 30 CPU-minutes)")
            + "."
        )
    out += [_merge_against_pruning(rows, budget) for budget in (15, 30)]
    pairs = [(b, _row(rows, "permute", b), _row(rows, "permute (KD only)", b)) for b in (5, 15, 30)]
    pairs = [(b, a, k) for b, a, k in pairs if a is not None and k is not None]
    if not pairs:
        out.append("- **P3 not measured here** (see `local_reconstruction.md`).")
    for budget, both, alone in pairs:
        verdict = "met" if both["perplexity"] < alone["perplexity"] else "not met"
        out.append(
            f"- **P3 at {budget} CPU-minutes ({verdict})**: permute merge, local + KD "
            f"{both['perplexity']:.4g} ({both['cpu_minutes']:.1f} CPU-min) against KD alone "
            f"{alone['perplexity']:.4g} ({alone['cpu_minutes']:.1f} CPU-min)."
        )
    return out


def _matched(merge: dict, prunes: list[dict]) -> dict | None:
    """The best pruning that removes at least the merge's net parameters (equal or harder)."""
    fair = [p for p in prunes if p["params_removed"] >= merge["params_removed"] - 1e-9]
    return min(fair, key=lambda r: r["perplexity"]) if fair else None


def _merge_against_pruning(rows: list[dict], budget: float) -> str:
    """P2: each merge against the best pruning removing at least as much; the closest pair."""
    prunes, merges = _rows(rows, PRUNES, budget), _rows(rows, MERGES, budget)
    pairs = [(m, p) for m in merges if (p := _matched(m, prunes)) is not None]
    if not pairs:
        return f"- **P2 at {budget} CPU-minutes: not measured.**"
    merge, prune = min(pairs, key=lambda pair: pair[0]["perplexity"] / pair[1]["perplexity"])
    verdict = "met" if merge["perplexity"] < prune["perplexity"] else "not met"
    hybrid = _row(rows, "hybrid", budget)
    extra = (
        ""
        if hybrid is None
        else f"; the hybrid: {hybrid['perplexity']:.4g} ({100 * hybrid['params_removed']:.1f}%)"
    )
    return (
        f"- **P2 at {budget} CPU-minutes ({verdict})**: the closest merge, {merge['variant']}, "
        f"{merge['perplexity']:.4g} ({100 * merge['params_removed']:.1f}% removed) against "
        f"the best whole-block pruning removing as much ({prune['variant']}) "
        f"{prune['perplexity']:.4g} ({100 * prune['params_removed']:.1f}% removed), a ratio of "
        f"{merge['perplexity'] / prune['perplexity']:.2f}{extra}."
    )


def encoder_targets(rows: list[dict]) -> list[str]:
    """P2 on the encoder: the best merge against pruning at equal parameters and CPU."""
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        prunes, merges = _rows(rows, PRUNES, budget), _rows(rows, MERGES, budget)
        if not prunes or not merges:
            continue
        merge = max(merges, key=lambda r: r["topic_accuracy"])
        prune = max(prunes, key=lambda r: r["topic_accuracy"])
        gap = 100 * (merge["topic_accuracy"] - prune["topic_accuracy"])
        verdict = "merging wins" if gap > 0 else "pruning wins" if gap < 0 else "a tie"
        missing = [v for v in MERGES if _row(rows, v, 0) and not _row(rows, v, budget)]
        unrun = f"; not run to this budget: {', '.join(missing)}" if missing else ""
        out.append(
            f"- **{budget:g} CPU-minutes ({verdict}{unrun})**: best merge {merge['variant']} "
            f"{merge['topic_accuracy']:.4f} ({100 * merge['params_removed']:.1f}% removed, "
            f"{merge['cpu_minutes']:.1f} CPU-min) against whole-block pruning "
            f"{prune['topic_accuracy']:.4f} ({100 * prune['params_removed']:.1f}% removed, "
            f"{prune['cpu_minutes']:.1f} CPU-min): {gap:+.1f} points."
        )
    return out


def report(study, state: dict, png: Path, key: str) -> str:
    """The Markdown of ``study`` (a quality_compute_studies.Study), run as ``--model key``."""
    option = "" if key == "smollm2-135m" else f" --model {key}"
    rows, metric = state["rows"], study.metric
    plot(rows, png, metric, study.title)
    out = [_introduction(study, state, png.name), table(rows, metric)]
    failed = state.get("failed", {})
    if failed:
        out.append("\nVariants that failed: ")
        out.append("; ".join(f"{k}: {v}" for k, v in failed.items()) + "\n")
    found = targets(rows) if metric == "perplexity" else encoder_targets(rows)
    out.append("\n## Targets\n\n" + "\n".join(found) + "\n")
    out.append(
        f"\n## Regenerate\n\n    python benchmarks/quality_compute.py{option}        "
        f"# the default budgets for every variant\n    python benchmarks/quality_compute.py"
        f"{option} --budgets 30 --variants VARIANT,...\n    python "
        f"benchmarks/quality_compute.py{option} --write-only --notes NOTES.md\n"
    )
    return "".join(out)


def _introduction(study, state: dict, png: str) -> str:
    kd = study.kd
    runs = (
        "One recovery run per variant and budget (local stage with default settings, then "
        "distillation, its cosine fitted to the budget: recover's defaults)"
        if study.run_per_budget
        else "One recovery run per variant (local stage with default settings, then "
        "distillation), stopped by its CPU budget and resumed"
    )
    common = (
        f"{runs}; the budget counts the run's user+system "
        "CPU time (setup, local stage, distillation), not the test evaluations. A row's CPU "
        "minutes are what the run had really spent when it stopped (the step that crosses the "
        "budget finishes, and the local stage runs whole). 2 cores shared with other jobs: "
        f"see the load column.\n\n![quality against CPU-minutes]({png})\n\n"
    )
    params = f"{state['original_parameters'] / 1e6:.2f}M parameters"
    if study.metric == "perplexity":
        return (
            f"# {study.title} (issue 25)\n\nOriginal test perplexity "
            f"{state['original_perplexity']:.4g} ({params}; 4096 "
            f"test tokens of fortunes). Distillation with batch {kd.batch_size} x {kd.seq_len} "
            f"tokens, peak lr {kd.lr:g}. " + common
        )
    return (
        f"# {study.title} (issue 25)\n\nOriginal topic accuracy "
        f"{state['original_topic_accuracy']:.4f} ({params}; a "
        "ridge probe on the sentence embeddings of the fortunes topic data, test split). "
        f"Distillation of last_hidden_state with batch {kd.batch_size} x {kd.seq_len} tokens, "
        f"lr {kd.lr:g}. " + common
    )
