"""The search report a person reads: the verdict, the finalists' table, the screening, time."""

from __future__ import annotations

__all__ = ["report_markdown", "time_spent"]

from layerfuse.reports.tables import human_bytes, human_count


def _quality(value: float, metric: str) -> str:
    return f"{value:.4g}" if metric == "perplexity" else f"{100 * value:.2f}%"


def _speed_cells(row: dict, decoding: bool) -> list[str]:
    memory = row.get("memory_bytes")
    cells = [
        f"{row['latency_ms']:.1f} ms ({row['speedup']:.2f}x)",
        "" if memory is None else human_bytes(memory),
    ]
    if decoding:
        speed = row.get("decode_tokens_per_second")
        cells.append("" if speed is None else f"{speed:.1f}")
    return cells


def _finalist_rows(report: dict) -> list[str]:
    metric, original = report["metric"], report["original"]
    rows = [original, *report["finalists"]]
    decoding = original.get("decode_tokens_per_second") is not None
    headers = ["model", "params", "file", "latency (speed-up)", "memory (RSS)"]
    headers += ["decode tok/s"] if decoding else []
    headers += ["screen (valid)", "test quality", "recovery CPU-min (steps)", "target", "limit"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        recover = row.get("recover") or {}
        screen = row.get("screen") or {}
        name = row["name"] + (" **(winner)**" if row["name"] == report["winner"] else "")
        cells = [
            name,
            f"{human_count(row['parameters'])} ({row['params_ratio']:.3f})",
            human_bytes(row["file_bytes"]),
            *_speed_cells(row, decoding),
            f"{screen['score']:.4g}" if screen else "",
            _quality(row["quality"], metric)
            + ("" if row is original else f" ({_loss(row, report)})"),
            f"{recover.get('cpu_seconds', 0) / 60:.1f} ({recover.get('steps', 0)})"
            if recover
            else "",
            "" if row is original else ("yes" if row["meets_target"] else "no"),
            "" if row is original else ("yes" if row["meets_limit"] else "no"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _loss(row: dict, report: dict) -> str:
    if report["limit"]["kind"] == "relative":
        return f"{1 + row['quality_loss']:.3f}x"
    return f"-{row['quality_loss']:.2f} pt"


def _screen_rows(report: dict) -> list[str]:
    lines = [
        "| candidate | params (ratio) | valid score (ratio) | meets target | finalist | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["candidates"]:
        s = c["results"]["screen"]
        if s.get("error"):
            lines.append(f"| {c['name']} | | not planned: {s['error']} | no | | |")
            continue
        ratio = f" ({s['score_ratio']:.3f})" if s.get("score_ratio") else ""
        lines.append(
            f"| {c['name']} | {human_count(s['parameters'])} ({s['params_ratio']:.3f}) | "
            f"{s['score']:.4g}{ratio} | {'yes' if s['meets_target'] else 'no'} | "
            f"{'yes' if c['finalist'] else ''} | {s['seconds']:.0f} |"
        )
    return lines


def time_spent(report: dict) -> dict:
    """CPU and wall seconds per stage, and each finalist's recovery split."""
    stages = report["stages"]
    per_finalist = {
        row["name"]: {
            "cpu_seconds": row["recover"].get("cpu_seconds", 0.0),
            "wall_seconds": row["recover"].get("wall_seconds", 0.0),
            "local_wall_seconds": row["recover"].get("local_seconds", 0.0),
            "steps": row["recover"].get("steps", 0),
            "tokens": row["recover"].get("tokens", 0),
            "scout_score": row["recover"].get("scout_score"),
            "led": "lead" in row["recover"],
        }
        for row in report["finalists"]
        if "quantized" not in row  # a quantized finalist shares its source's recovery
    }
    return {"stages": stages, "recovery": per_finalist}


def report_markdown(report: dict) -> str:
    target, limit, budget = report["target"], report["limit"], report["budget"]
    lines = [
        f"# layerfuse optimize: {report['model']}",
        "",
        f"Target `{target['text']}`, quality limit `{limit['text']}` ({report['metric']}, test "
        f"split), recovery budget `{budget['text']}`, seed {report['seed']}, data "
        f"{report['data']}.",
        "",
        f"**{report['why']}**",
        "",
        "## Finalists, measured side by side (from the files as written)",
        "",
        *_finalist_rows(report),
        "",
        "![Pareto](report.png)",
        "",
        "## Screening (training-free, validation split)",
        "",
        *_screen_rows(report),
        "",
    ]
    if report["not_proposed"]:
        lines += ["Not proposed: " + "; ".join(report["not_proposed"]) + ".", ""]
    spent = time_spent(report)
    lines += ["## Where time went", "", "| stage | wall s | CPU s |", "|---|---|---|"]
    for stage, record in spent["stages"].items():
        lines.append(f"| {stage} | {record['wall_seconds']:.0f} | {record['cpu_seconds']:.0f} |")
    lines += [
        "",
        "| finalist | recovery CPU s | wall s | local stage wall s | steps | tokens | valid "
        "after scouting |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in spent["recovery"].items():
        scouted = "" if r["scout_score"] is None else f"{r['scout_score']:.4g}"
        lines.append(
            f"| {name} | {r['cpu_seconds']:.0f} | {r['wall_seconds']:.0f} | "
            f"{r['local_wall_seconds']:.0f} | {r['steps']} | {r['tokens']} | "
            f"{scouted}{' (led: got the rest)' if r['led'] else ''} |"
        )
    return "\n".join(lines) + "\n"
