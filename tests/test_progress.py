"""Progress reaches logs: a stage is never silent when stderr is not a terminal."""

from __future__ import annotations

from layerfuse import progress


def test_logged_progress_prints_start_middle_and_end(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    reporter = progress.ConsoleReporter()
    assert not reporter.console.is_terminal
    assert list(reporter.track(range(3), 3, "window search")) == [0, 1, 2]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("window search: started (3 to do)")
    assert [line.split(": ")[1].split(" after")[0] for line in lines[1:4]] == ["1/3", "2/3", "3/3"]
    assert "window search: 3 done in" in lines[-1]
