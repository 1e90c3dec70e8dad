"""The digits demo: its leaky setting is flagged, and the command prints what it promises."""


from _history import checks_in  # noqa: E402

import fesmia_hooks as fh
from fesmia_hooks.cli import main
from fesmia_hooks.demos.digits import run_torch_demo


def test_leaky_demo_rises_above_none_and_stops(tmp_path):
    lines = []
    monitor = run_torch_demo(log_dir=tmp_path, epochs=40, out=lines.append)
    levels = [r.level for r in monitor.history]
    assert max(levels) > fh.Level.NONE
    assert monitor.should_stop and monitor.stop_reason is fh.StopReason.LEVEL_EXCEEDED
    last = monitor.history[-1]
    assert last.breached and last.significant and last.strict > last.chance_strict
    assert monitor.stopped_epoch == last.epoch < 39
    assert any(line.startswith("stopped at epoch") for line in lines)
    history = checks_in(tmp_path / "privacy_history.jsonl")
    assert len(history) == monitor.checks and history[-1]["action"] == "stop"


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--log-dir", str(tmp_path), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("strict") >= 2 and "chance 0.18" in out and str(tmp_path) in out
