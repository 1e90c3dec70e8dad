"""The driver every adapter shares: options, canaries, the run-start rule, the horizon, stops."""

import json

import pytest
import torch
from _history import checks_in, headers_in
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.calibration import expected_checks
from fesmia_hooks.integrations.driver import MonitorDriver, load_canaries
from fesmia_hooks.plots import leakage_figure
from fesmia_hooks.sinks import HISTORY_FILE


def canaries(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    return fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))


def make_canaries():
    """An importable canary factory, as a configuration file names it."""
    return canaries(seed=1)


def small_probe():
    return fh.FeSMIA(episodes=10, permutations=19)


@pytest.mark.parametrize(
    "limits, every, expected",
    [
        ({"max_epochs": 1000, "max_steps": 300, "steps_per_epoch": 10}, {"every_n_epochs": 1}, 30),
        ({"max_epochs": 1000, "max_steps": -1}, {"every_n_epochs": 4}, 250),
        ({"max_epochs": None, "max_steps": 95, "steps_per_epoch": 10}, {"every_n_epochs": 2}, 5),
        ({"max_epochs": 3, "steps_per_epoch": 40}, {"every_n_steps": 50}, 2),
        ({"max_epochs": 30, "max_steps": 100, "steps_per_epoch": 10}, {"every_n_steps": 25}, 4),
        ({"max_epochs": -1, "max_steps": -1}, {"every_n_epochs": 1}, None),
        ({"max_epochs": 2}, {"every_n_epochs": 5}, 1),
    ],
)
def test_the_horizon_comes_from_whichever_limit_ends_the_run(limits, every, expected):
    every = {"every_n_epochs": None, "every_n_steps": None, **every}
    assert expected_checks(**every, **limits) == expected


def test_canaries_from_a_factory_a_callable_or_a_source_object():
    assert load_canaries("test_driver:make_canaries").fingerprint() == canaries(1).fingerprint()
    assert load_canaries(make_canaries).fingerprint() == canaries(1).fingerprint()
    driver = MonitorDriver("test_driver:make_canaries", probe=small_probe())
    assert driver.monitor.canaries is None  # built when the run starts
    driver.begin_run()
    assert driver.monitor.canaries.fingerprint() == canaries(1).fingerprint()

    class DataModule:
        canaries = canaries(2)

    from_source = MonitorDriver(probe=small_probe())
    from_source.begin_run(canary_sources=(None, DataModule()))
    assert from_source.monitor.canaries is DataModule.canaries


@pytest.mark.parametrize(
    "source, message",
    [
        ("no_colon", "must be 'package.module:function', got 'no_colon'"),
        ("test_driver:nothing_here", "test_driver has no callable 'nothing_here'"),
        ("no_such_module_xyz:f", "cannot be imported"),
        (lambda: (1, 2), "must return a CanarySet or SequenceCanarySet, got tuple"),
    ],
)
def test_bad_canary_factories_are_explained(source, message):
    with pytest.raises(fh.ConfigurationError, match=message):
        load_canaries(source)


def test_no_canaries_anywhere_is_explained():
    driver = MonitorDriver(probe=small_probe())
    with pytest.raises(fh.ConfigurationError, match="no canaries: pass `canaries`"):
        driver.begin_run(canary_sources=(object(),))


def test_a_ready_monitor_or_options_not_both():
    ready = fh.PrivacyMonitor(canaries(), probe=small_probe())
    assert MonitorDriver(monitor=ready).monitor is ready
    with pytest.raises(fh.ConfigurationError, match=r"got both: \['every_n_epochs'\]"):
        MonitorDriver(monitor=ready, every_n_epochs=2)
    with pytest.raises(fh.ConfigurationError, match="must be a fesmia_hooks.PrivacyMonitor"):
        MonitorDriver(monitor="monitor")
    with pytest.raises(fh.ConfigurationError, match="`canaries` must be a CanarySet, a Seq"):
        MonitorDriver(3)


def run(driver, epochs, model, **begin):
    driver.begin_run(**begin)
    for epoch in range(epochs):
        driver.run_check(model, epoch=epoch)
    driver.end_run()


def test_every_run_is_new_unless_a_state_was_loaded(tmp_path):
    model = nn.Linear(4, 2)
    driver = MonitorDriver(canaries(), probe=small_probe(), log_dir=tmp_path, tensorboard=False)
    run(driver, 2, model, max_epochs=4)
    first = driver.monitor.run_id
    saved = json.loads(json.dumps(driver.state_dict()))
    assert driver.monitor.calibration.horizon == 4
    run(driver, 3, model, max_epochs=6)  # a second fit: a new run
    assert driver.monitor.run_id != first and [r.check for r in driver.history] == [1, 2, 3]
    assert driver.monitor.calibration.horizon == 6
    driver.load_state_dict(saved)  # resuming the first run
    driver.begin_run(max_epochs=99)  # the horizon is the saved run's, not the new limit's
    assert driver.monitor.run_id == first and driver.monitor.calibration.horizon == 4
    driver.run_check(model, epoch=2)
    assert [r.check for r in driver.history] == [1, 2, 3]
    driver.monitor.flush()
    lines = checks_in(tmp_path / HISTORY_FILE)
    assert [(line["run_id"] == first, line["check"]) for line in lines] == [
        (True, 1), (True, 2), (False, 1), (False, 2), (False, 3), (True, 3)]
    assert len(headers_in(tmp_path / HISTORY_FILE)) == 2


def test_only_rank_zero_writes_but_every_rank_checks(tmp_path):
    seen = []

    class Sink:
        def log(self, report, step):
            seen.append(step)

        def close(self):
            pass

    driver = MonitorDriver(canaries(), probe=small_probe(), log_dir=tmp_path, sinks=[Sink()])
    run(driver, 2, nn.Linear(4, 2), rank_zero=False)
    assert len(driver.history) == 2 and seen == [] and not any(tmp_path.iterdir())
    run(driver, 2, nn.Linear(4, 2), rank_zero=True)
    assert seen == [0, 1] and (tmp_path / HISTORY_FILE).exists()


def test_a_stop_on_any_rank_stops_this_one():
    driver = MonitorDriver(canaries(), probe=small_probe())
    driver.begin_run()
    assert not driver.reduce_stop(lambda flag: flag, epoch=0)
    assert driver.reduce_stop(lambda flag: True, epoch=3)  # another rank wants to stop
    assert driver.should_stop and driver.stopped_epoch == 3
    driver.begin_run()  # a new run forgets it
    assert not driver.should_stop and driver.stopped_epoch is None


def test_a_report_is_redrawn_from_its_history_alone(tmp_path):
    pytest.importorskip("matplotlib")
    bands = fh.LevelBands(moderate=0.3, high=0.6, critical=0.9)
    monitor = fh.PrivacyMonitor(
        canaries(), probe=small_probe(), budget=fh.LeakageBudget(max_level="moderate"),
        bands=bands, alpha=0.1, horizon=3, log_dir=tmp_path, tensorboard=False,
    )
    for epoch in range(3):
        monitor.step(nn.Linear(4, 2), epoch=epoch)
    monitor.flush()
    [header] = headers_in(tmp_path / HISTORY_FILE)
    settings = header["settings"]
    assert settings["calibration"] == {"alpha": 0.1, "horizon": 3,
                                       "statistic": "signal_mean+centroid_strict",
                                       "bands": {"moderate": 0.3, "high": 0.6,
                                                 "critical": 0.9, "on": "strict"}}
    assert settings["budget"]["max_level"] == "moderate"
    assert settings["probe"]["permutations"] == 19
    assert settings["canaries"]["fingerprint"] == canaries().fingerprint()
    from fesmia_hooks.history import load_runs

    [run_] = load_runs(tmp_path)
    figure = leakage_figure(run_)
    budget_line = [a for ax in figure.axes for a in ax.get_lines() if a.get_gid() == "budget"]
    assert budget_line[0].get_ydata()[0] == pytest.approx(0.6)  # where "high" starts
    from fesmia_hooks.cli import main

    assert main(["report", str(tmp_path), "--no-plot"]) == 0
