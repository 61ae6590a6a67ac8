"""The Markdown report, the validation plot and the SmolLM2 targets of ``recovery.py``."""

from __future__ import annotations

from pathlib import Path

from common import markdown_table


def targets(rows: list[dict]) -> dict:
    """The claims this benchmark checks on SmolLM2, each with its numbers and whether it holds
    (None where a variant was not run)."""
    after = {r["variant"]: r["after_recovery"] for r in rows if r["model"] == "smollm2-135m"}
    base = after.get("original")

    def check(a: str, b: str | None, factor: float = 1.0) -> dict:
        value_b = base if b is None else after.get(b)
        if a not in after or value_b is None:
            return {"met": None}
        return {"met": after[a] <= factor * value_b, a: after[a], b or "original": value_b}

    return {
        "permute within 1.3x of the original": check("merge permute", None, 1.3),
        "permute beats vanilla": check("merge permute", "merge vanilla"),
        "merging beats pruning": check("merge permute", "prune blocks"),
    }


def _targets_markdown(found: dict) -> str:
    lines = ["\n## Targets (SmolLM2-135M, after recovery)\n\n"]
    for claim, result in found.items():
        verdict = {True: "met", False: "NOT met", None: "not run"}[result["met"]]
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "met")
        lines.append(f"- {claim}: **{verdict}**" + (f" ({numbers})" if numbers else "") + "\n")
    return "".join(lines)


def _cells(r: dict, base: dict) -> list:
    """One table row: sizes, quality before/after, and the training the variant got."""
    trained = r["variant"] != "original"
    return [
        r["variant"],
        f"{r['parameters'] / 1e6:.2f}M",
        f"{100 * (1 - r['parameters'] / base['parameters']):.1f}%",
        f"{base['after_surgery']:.4g}",
        f"{r['after_surgery']:.4g}",
        f"{r['after_recovery']:.4g}",
        f"{r['after_recovery'] / base['after_surgery']:.2f}x",
        r["training"]["best_step"] if trained else "-",
        f"{r['training']['tokens_seen']:,}" if trained else "-",
        f"{r['train_seconds_this_run'] / 60:.1f}" if trained else "-",
    ]


def markdown(rows: list[dict], budgets: dict, variants: dict, name: str = "recovery") -> str:
    """``variants``: the variant names planned per model; those without a row are listed."""
    out = ["# Recovery training: merged, pruned and fused models distilled back\n"]
    out.append(
        "Each variant trained from the optimized graph's own weights against the original graph "
        "(objective `kd`, all weights), with one budget per model; numbers on the test split. "
        "Validation is on the valid split; the best validation step is kept. `minutes`: wall "
        "time of the recover call (training, validation and write-back) on 2 CPU cores shared "
        "with other jobs.\n"
    )
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        base = next(r for r in own if r["variant"] == "original")
        budget = budgets[model]
        tokens = budget["steps"] * budget["batch_size"] * budget["grad_accum"] * budget["seq_len"]
        out.append(
            f"\n## {model}\n\nBudget: {budget['steps']} steps x {budget['batch_size']} x "
            f"{budget['grad_accum']} x {budget['seq_len']} tokens (<= {tokens:,} training "
            f"tokens), AdamW lr {budget['lr']:g}, {budget['warmup']} warm-up steps, cosine.\n\n"
        )
        table = [_cells(r, base) for r in own]
        metric = base["metric"].replace("_", " ")
        headers = ["variant", "params", "removed", f"{metric} original", "after surgery"]
        headers += ["after recovery", "vs original", "best step", "tokens", "minutes"]
        out.append(markdown_table(headers, table))
    missing = [
        f"{model} {name}"
        for model, names in variants.items()
        for name in names
        if not any(r["model"] == model and r["variant"] == name for r in rows)
    ]
    if missing:
        names = ", ".join(missing)
        out.append(f"\nNot run for this result (time on the shared machine): {names}.\n")
    out.append(_targets_markdown(targets(rows)))
    out.append(f"\n![validation during recovery]({name}.png)\n")
    return "".join(out)


def plot(rows: list[dict], path: Path) -> None:
    from layerfuse.reports.plots import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        if r["model"] == "smollm2-135m" and r["variant"] != "original":
            history = r["training"]["history"]
            axis.plot([h["step"] for h in history], [h["valid"] for h in history], marker=".",
                      label=r["variant"])  # fmt: skip
    base = next(r for r in rows if r["model"] == "smollm2-135m" and r["variant"] == "original")
    axis.axhline(base["valid_perplexity"], color="black", linestyle="--", label="original")
    axis.axhline(1.3 * base["valid_perplexity"], color="grey", linestyle=":", label="1.3x original")
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel("validation perplexity")
    axis.set_title("SmolLM2-135M: recovery by distillation")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)
