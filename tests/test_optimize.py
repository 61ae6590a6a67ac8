"""``layerfuse optimize`` end to end on the tiny Llama, with a budget of seconds.

The search is stopped after screening (as an interrupted run would be) and continued by
running it again; the report's claims are then checked against re-measurement of the winner
written to disk: its parameter count, that it meets the target, its test perplexity. Plans
are the same for the same seed; bad targets, limits and spaces are one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerfuse.cli import main
from layerfuse.errors import LayerfuseError
from layerfuse.model.io import load_model, parameter_count
from layerfuse.optimize import (
    OptimizeRequest,
    optimize,
    parse_budget,
    parse_limit,
    parse_target,
)
from layerfuse.optimize.report import time_spent
from layerfuse.optimize.space import load_space, space_document
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.registry import load_plan
from layerfuse.progress import Reporter
from layerfuse.runtime.evaluate import evaluate_model

SPACE = {
    "screen": {"calib_tokens": 512, "valid_tokens": 256, "seq_len": 32},
    # An even split (no race) here: the race has its own test on a token budget.
    "recover": {
        "local_steps": 10,
        "batch_size": 2,
        "grad_accum": 1,
        "seq_len": 32,
        "scout_share": 1.0,
    },
    "measure": {"test_tokens": 256, "shape": "1x32", "latency_runs": 3},
    "finalists": 2,
    # Hybrids have a test of their own; here the two finalists must fit the budget's
    # split (a hybrid's first phase alone can spend it), so the second one gets recovered.
    "hybrid": {"enabled": False},
}
BUDGET = "30s"  # shares that a loaded machine cannot spend in the first phase alone


class _Recorder(Reporter):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def step(self, message: str) -> None:
        self.messages.append(message)


def _request(model: Path, output: Path, **changes) -> OptimizeRequest:
    request = OptimizeRequest(
        model=model,
        output=output,
        target=parse_target("params=0.8"),
        limit=parse_limit("30%"),
        budget=parse_budget(BUDGET),
        space=space_document(SPACE),
    )
    for key, value in changes.items():
        setattr(request, key, value)
    return request


class _Interrupt(Reporter):
    """Interrupts the search (as Ctrl-C would) when the second finalist's recovery starts."""

    def step(self, message: str) -> None:
        if message.startswith("recovering") and "(2/" in message:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def search(tiny, tmp_path_factory) -> tuple[Path, Path, dict, _Recorder]:
    """The search stopped after screening, continued and interrupted during recovery, then
    continued to the end."""
    model = tiny.model("llama")
    output = tmp_path_factory.mktemp("optimize") / "out"
    assert optimize(_request(model, output, stop_after="screen")) is None
    assert not (output / "report.json").exists()
    with pytest.raises(KeyboardInterrupt):
        optimize(_request(model, output), _Interrupt())
    assert not (output / "report.json").exists()
    recorder = _Recorder()
    report = optimize(_request(model, output), recorder)
    return model, output, report, recorder


def test_the_interrupted_search_continues_where_it_stopped(search):
    _, output, report, recorder = search
    screened = [c["name"] for c in report["candidates"]]
    assert "continuing the search in " + str(output) in recorder.messages
    for name in screened:
        assert f"screening {name}: done earlier" in recorder.messages
    assert not any(m.startswith("aligning") for m in recorder.messages)
    first, second = (r["name"] for r in report["finalists"])
    assert f"recovering {first}: done earlier" in recorder.messages
    assert any(m.startswith(f"recovering {second} (2/2)") for m in recorder.messages)
    state = json.loads((output / "state.json").read_text())
    assert set(state["done"]["stage"]) == {"screen", "recover", "measure"}


def test_the_reports_claims_hold_on_the_written_winner(search):
    model, output, report, _ = search
    assert report["winner"] is not None, report["why"]
    winner_path = output / "winner" / "model.onnx"
    row = next(r for r in report["finalists"] if r["name"] == report["winner"])
    original = parameter_count(load_model(model))
    written = parameter_count(load_model(winner_path))
    assert written == row["parameters"]
    assert report["original"]["parameters"] == original
    assert written <= 0.8 * original and row["meets_target"]
    assert row["memory_bytes"] > 0 and row["decode_tokens_per_second"] is None  # no KV cache
    # The winner's plan replays on the original into the same structure.
    plan = load_plan(output / "winner" / "plan.json")
    assert parameter_count(apply_plan(model, plan)) == written
    again = evaluate_model(winner_path, tokens=256, seq_len=32, latency_runs=1)["perplexity"]
    assert again == pytest.approx(row["quality"], rel=1e-4)
    assert again <= report["original"]["quality"] * 1.3
    for finalist in report["finalists"]:
        assert (output / "finalists" / finalist["name"] / "plan.json").is_file()
    for suffix in ("json", "md", "png"):
        assert (output / f"report.{suffix}").is_file()
    assert report["why"] in (output / "report.md").read_text()


def test_the_budget_is_split_and_accounted(search):
    _, _, report, _ = search
    spent = [r["recover"]["cpu_seconds"] for r in report["finalists"]]
    assert len(spent) == SPACE["finalists"]
    assert all(s > 0 for s in spent)
    # Each finalist's first phase is paid in full even when it overruns its share.
    assert sum(spent) <= 3 * parse_budget(BUDGET).seconds
    assert all(r["recover"]["steps"] >= 1 for r in report["finalists"])


def test_the_race_scouts_every_finalist_and_gives_the_leader_the_rest(tiny, tmp_path):
    """A token budget makes the shares exact: half scouts (2 x 512 tokens), half leads."""
    recover = {**SPACE["recover"], "scout_share": 0.5}
    space = space_document({**SPACE, "recover": recover})
    model, output = tiny.model("llama"), tmp_path / "out"
    request = _request(model, output, budget=parse_budget("2048-tokens"), space=space)
    report = optimize(request)
    records = {r["name"]: r["recover"] for r in report["finalists"]}
    leader = min(records, key=lambda name: (records[name]["scout_score"], name))
    per_step = recover["batch_size"] * recover["seq_len"]
    for name, record in records.items():
        scouted = record.get("scout", record)
        assert scouted["tokens"] == 512 // per_step * per_step
        assert ("lead" in record) == (name == leader)
    lead = records[leader]["lead"]
    assert lead["tokens"] == (2048 - 2 * 512) // per_step * per_step
    assert records[leader]["steps"] == records[leader]["scout"]["steps"] + lead["steps"]
    assert Path(lead["model"]) == output / "finalists" / leader / "lead" / "model.onnx"
    row = next(r for r in report["finalists"] if r["name"] == leader)
    again = evaluate_model(lead["model"], tokens=256, seq_len=32, latency_runs=1)["perplexity"]
    assert again == pytest.approx(row["quality"], rel=1e-4)  # the leader measured is the lead
    assert "(led: got the rest)" in (output / "report.md").read_text()
    # Scouted models are scored from their own files: an unrecovered one scores what
    # screening scored its in-memory rewrite of the original.
    scorer = DataSettings(calib_tokens=512, valid_tokens=256, seq_len=32, provider="auto").scorer(
        model
    )
    for row in report["finalists"]:
        compressed = output / "finalists" / row["name"] / "compressed" / "model.onnx"
        assert scorer.score_file(compressed) == pytest.approx(row["screen"]["score"], rel=1e-5)
    recorder = _Recorder()
    assert optimize(request, recorder)["winner"] == report["winner"]
    assert not any(m.endswith("gets the rest of the budget") for m in recorder.messages)


def test_plans_are_the_same_for_a_seed(tiny, tmp_path):
    model = tiny.model("llama")
    plans = []
    for run in ("a", "b"):
        optimize(_request(model, tmp_path / run, stop_after="screen", seed=3))
        folder = tmp_path / run / "candidates"
        plans.append({p.parent.name: p.read_text() for p in sorted(folder.glob("*/plan.json"))})
    assert plans[0] and plans[0] == plans[1]


def test_quantized_finalists_are_judged_on_their_sources_parameters(tiny, tmp_path):
    """With no recovery budget and --quantize int8, each finalist is measured as written and
    quantized; the quantized row keeps its source's parameters and plan, with fewer bytes."""
    model = tiny.model("llama")
    changes = {"budget": parse_budget("0"), "quantize": "int8"}
    report = optimize(_request(model, tmp_path / "out", **changes))
    rows = {r["name"]: r for r in report["finalists"]}
    plain = [name for name in rows if "+" not in name]
    assert len(plain) == SPACE["finalists"] and len(rows) == 2 * len(plain)
    for name in plain:
        quantized = rows[f"{name}+int8"]
        written = tmp_path / "out" / "finalists" / name / "int8" / "model.onnx"
        assert quantized["path"] == str(written) and written.is_file()
        assert quantized["parameters"] == rows[name]["parameters"]
        assert quantized["params_ratio"] == rows[name]["params_ratio"]
        assert quantized["weight_bytes"] < 0.6 * rows[name]["weight_bytes"]
        assert quantized["plan"] == rows[name]["plan"]
    assert sorted(time_spent(report)["recovery"]) == sorted(plain)


def test_a_hybrid_prunes_then_ties_and_its_plans_replay_in_order(tiny, tmp_path):
    """Only hybrids in the space: the finalist is blocks pruned and FFs tied in what is left;
    its two plans, applied in order to the original, give the finalist's parameter count."""
    model = tiny.model("llama")
    space = {**SPACE, "finalists": 1, "merge": {"enabled": False}, "hybrid": {"enabled": True}}
    space |= {"prune": {"enabled": False}, "attention": {"enabled": False}}
    changes = {"budget": parse_budget("0"), "space": space_document(space)}
    changes["target"] = parse_target("params=0.9")
    report = optimize(_request(model, tmp_path / "out", **changes))
    (row,) = report["finalists"]
    assert row["kind"] == "hybrid" and len(row["plans"]) == 2
    prune, merge = (load_plan(path) for path in row["plans"])
    assert len(prune.blocks) == row["options"]["count"]
    assert parameter_count(merge.apply(prune.apply(load_model(model)))) == row["parameters"]
    assert row["parameters"] < report["original"]["parameters"]


def test_a_fusion_removes_attention_and_fuses_the_ffs_it_leaves_adjacent(tiny, tmp_path):
    """Only FFN Fusion in the space: the finalist's plan drops a contiguous run of attention
    sublayers and fuses the FFs around them; it replays to the finalist's parameter count."""
    model = tiny.model("llama")
    space = {**SPACE, "finalists": 1, "merge": {"enabled": False}}
    space |= {"prune": {"enabled": False}, "attention": {"enabled": False}}
    changes = {"budget": parse_budget("0"), "space": space_document(space)}
    changes["target"] = parse_target("params=0.97")
    report = optimize(_request(model, tmp_path / "out", **changes))
    (row,) = report["finalists"]
    assert row["kind"] == "fuse"
    plan = load_plan(row["plan"])
    dropped = plan.drop_attention
    assert len(dropped) == row["options"]["count"] >= 1
    assert dropped == list(range(dropped[0], dropped[0] + len(dropped)))
    assert plan.fuse and all(last > first for first, last in plan.fuse)
    assert parameter_count(plan.apply(load_model(model))) == row["parameters"]
    assert row["parameters"] < report["original"]["parameters"]


def test_a_rerun_with_other_settings_is_refused(search):
    model, output, _, _ = search
    with pytest.raises(LayerfuseError, match="other settings"):
        optimize(_request(model, output, seed=1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--target", "params=1.5"], "is not a target"),
        (["--target", "speed=2"], "is not a target"),
        (["--max-quality-loss", "1pt"], "judged by perplexity"),
        (["--recover-budget", "soon"], "is not a budget"),
        (["--quantize", "int3"], "unknown --quantize 'int3'"),
    ],
)
def test_bad_options_are_one_line_errors(tiny, tmp_path, capsys, options, message):
    model = tiny.model("llama")
    argv = ["optimize", str(model), "-o", str(tmp_path / "out"), "--target", "params=0.8"]
    argv += ["--max-quality-loss", "10%", *options]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_the_space_file_is_checked(tmp_path):
    path = tmp_path / "space.json"
    assert main(["optimize", "--write-space", str(path)]) == 0
    assert load_space(path).to_json() == load_space(None).to_json()
    path.write_text(json.dumps({"merge": {"windowz": [1]}}))
    with pytest.raises(LayerfuseError, match=r"unknown key space\.merge\.windowz"):
        load_space(path)
    path.write_text(json.dumps({"finalists": "three"}))
    with pytest.raises(LayerfuseError, match="finalists must be a whole number"):
        load_space(path)
    path.write_text(json.dumps({"recover": {"scout_share": 1.5}}))
    with pytest.raises(LayerfuseError, match=r"recover\.scout_share must lie in \(0, 1\]"):
        load_space(path)


def test_targets_limits_and_budgets_parse():
    assert parse_target("params=80%").value == pytest.approx(0.8)
    assert parse_target("latency=1.2x").value == pytest.approx(1.2)
    assert parse_target("memory=300MB").value == 300e6
    assert parse_limit("10%").value == pytest.approx(0.1)
    assert parse_limit("1pt").kind == "points"
    assert parse_budget("30m").seconds == 1800
    assert parse_budget("100k-tokens").tokens == 100_000
    assert parse_budget("0").seconds == 0
