"""The digits demo: its leaky setting is flagged, and the command prints what it promises."""

import math

import pytest
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


def test_dp_demo_command_prints_both_epsilons_per_run(tmp_path, capsys):
    pytest.importorskip("opacus")
    pytest.importorskip("sklearn")
    assert main(["demo", "--dp", "--epochs", "2", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] in (["eps1"], ["eps8"], ["non-private"]) and len(line.split()) > 4}
    assert sorted(rows) == ["eps1", "eps8", "non-private"]
    for name, target in (("eps1", 1.0), ("eps8", 8.0), ("non-private", 0.0)):
        folder = tmp_path / name
        checks = checks_in(folder / "privacy_history.jsonl")
        assert [c["check"] for c in checks] == [1, 2]
        assert list(folder.glob("events.out.tfevents.*"))
        last = checks[-1]
        accountant, bound = last["epsilon_accountant"], last["epsilon_lower_bound"]
        row = rows[name]  # run, ε accountant, ε lower bound, strict, (chance), accuracy, s
        if target:  # the noise was sized to spend the target in the 2 epochs run
            assert target - 0.1 < accountant <= target
            assert 0.0 <= bound <= accountant
            assert row[1] == f"{accountant:.2f}"
        else:
            assert accountant is None and row[1] == "-"  # no accountant without DP
            assert math.isfinite(bound) and bound >= 0.0
        assert row[2] == f"{bound:.2f}"
        assert row[3] == f"{last['log_mia_strict']:.2f}"
        assert row[4] == f"({last['chance_strict']:.2f})"
    assert f"tensorboard --logdir {tmp_path}" in out
