"""A CPU-time budget ends distillation; the summary says where the CPU time went.

Tiny llama (4 blocks, width 32) with FFs 1-3 tied, local stage then distillation: a budget
smaller than setup + local stage runs no distillation step; a resume with a budget just
above the time already charged runs exactly one step (a resume's reloading is not charged);
a resume without a budget finishes the run at the weights of an uninterrupted run. Every
summary's CPU minutes are setup + local + KD.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from layerfuse.errors import LayerfuseError
from layerfuse.recover.run import RecoverRequest, recover
from layerfuse.recover.settings import TrainSettings
from tests.test_local_reconstruction import LOCAL, SETTINGS, _weights, llama, text  # noqa: F401

# The rate decays over the steps, so a budget only says where to stop and a resume may move it.
STEPS = replace(SETTINGS, steps=4, schedule="steps")


def _adds_up(summary: dict) -> None:
    parts = ("setup_cpu_minutes", "local_cpu_minutes", "kd_cpu_minutes")
    assert all(summary[part] >= 0 for part in parts)
    assert math.isclose(summary["cpu_minutes"], sum(summary[p] for p in parts), abs_tol=1e-12)


def test_a_budget_stops_distillation_and_a_resume_continues_it(llama, text, tmp_path):  # noqa: F811
    original, merged = llama
    checkpoints = tmp_path / "checkpoints"
    tiny = replace(STEPS, budget_minutes=1e-9)
    request = RecoverRequest(
        original, merged, tmp_path / "a.onnx", data=str(text), settings=tiny, local=LOCAL,
        checkpoint_dir=checkpoints,
    )  # fmt: skip
    first = recover(request)
    assert first["stopped_by_budget"] and first["finished"]
    assert first["steps_done"] == 0 and first["tokens_seen"] == 0
    assert first["local_cpu_minutes"] > 0 and first["kd_cpu_minutes"] == 0
    _adds_up(first)

    one_step = replace(STEPS, budget_minutes=first["cpu_minutes"] + 1e-9)
    second = recover(replace(request, output=tmp_path / "b.onnx", settings=one_step, resume=True))
    assert second["stopped_by_budget"] and second["steps_done"] == 1
    assert second["tokens_seen"] == STEPS.batch_size * STEPS.seq_len
    assert second["local_cpu_minutes"] == first["local_cpu_minutes"]
    assert second["setup_cpu_minutes"] == first["setup_cpu_minutes"]
    assert second["kd_cpu_minutes"] > 0 and second["cpu_minutes"] > one_step.budget_minutes
    _adds_up(second)

    last = recover(replace(request, output=tmp_path / "c.onnx", settings=STEPS, resume=True))
    assert not last["stopped_by_budget"] and last["steps_done"] == STEPS.steps
    assert last["kd_cpu_minutes"] > second["kd_cpu_minutes"]
    _adds_up(last)
    whole = recover(replace(request, output=tmp_path / "whole.onnx", settings=STEPS,
                            checkpoint_dir=None))  # fmt: skip
    assert not whole["stopped_by_budget"] and whole["steps_done"] == STEPS.steps
    _adds_up(whole)
    expected, got = _weights(tmp_path / "whole.onnx"), _weights(tmp_path / "c.onnx")
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-7, rtol=0, err_msg=name)


@pytest.mark.parametrize("budget", [-1.0, math.nan, math.inf])
def test_a_budget_must_be_finite_and_not_negative(budget):
    with pytest.raises(LayerfuseError, match="budget-minutes"):
        TrainSettings(budget_minutes=budget).check(1)
    TrainSettings(budget_minutes=0.0).check(1)


def test_a_fitted_schedule_anneals_by_the_end_of_the_budget():
    fitted = TrainSettings(steps=1000, warmup=2, lr=1e-3, min_lr_ratio=0.1, budget_minutes=5.0)
    assert fitted.fits_budget and not replace(fitted, schedule="steps").fits_budget
    assert not replace(fitted, budget_minutes=0.0).fits_budget
    assert fitted.learning_rate_factor(0) == 0.5  # warm-up is counted in steps either way
    assert fitted.learning_rate_factor(10, budget_progress=0.0) == pytest.approx(1.0, abs=1e-3)
    assert fitted.learning_rate_factor(10, budget_progress=0.5) == pytest.approx(0.55)
    assert fitted.learning_rate_factor(10, budget_progress=1.0) == pytest.approx(0.1)
    assert fitted.learning_rate_factor(10, budget_progress=3.0) == pytest.approx(0.1)
    over_steps = replace(fitted, schedule="steps")
    assert over_steps.learning_rate_factor(10, budget_progress=1.0) == pytest.approx(1.0, abs=1e-3)
    # The step count still ends the cosine when it comes first.
    assert fitted.learning_rate_factor(1000, budget_progress=0.2) == pytest.approx(0.1)


def test_a_fitted_run_ends_annealed_and_resumes_only_under_its_own_budget(llama, text, tmp_path):  # noqa: F811
    original, merged = llama
    request = RecoverRequest(
        original, merged, tmp_path / "probe.onnx", data=str(text), local=replace(LOCAL, steps=0),
        settings=replace(SETTINGS, steps=10_000, warmup=1, budget_minutes=1e-9),
    )  # fmt: skip
    setup = recover(request)["cpu_minutes"]  # no step: what a run costs before its first
    fitted = replace(request.settings, budget_minutes=setup + 0.1)
    runs = {}
    for schedule in ("auto", "steps"):
        settings = replace(fitted, schedule=schedule)
        runs[schedule] = recover(
            replace(request, output=tmp_path / f"{schedule}.onnx", settings=settings,
                    checkpoint_dir=tmp_path / schedule)
        )  # fmt: skip
        assert runs[schedule]["stopped_by_budget"] and runs[schedule]["steps_done"] >= 3
    peak, floor = fitted.lr, fitted.lr * fitted.min_lr_ratio
    assert runs["auto"]["last_lr"] <= floor + 0.1 * (peak - floor)  # annealed by the end
    assert runs["steps"]["last_lr"] > 0.99 * peak  # over 10,000 steps: still at the peak
    resumed = replace(request, output=tmp_path / "again.onnx", settings=fitted, resume=True,
                      checkpoint_dir=tmp_path / "auto")  # fmt: skip
    assert recover(resumed)["steps_done"] == runs["auto"]["steps_done"]  # the budget was spent
    other = replace(fitted, budget_minutes=fitted.budget_minutes * 2)
    with pytest.raises(LayerfuseError, match="checkpoint"):
        recover(replace(resumed, settings=other))
