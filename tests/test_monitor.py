"""PrivacyMonitor and LeakageBudget driven by scripted reports (no training)."""

import json

import pytest
import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.measurement import STATISTICS


def measured(strict, leaking):
    """A measurement whose permutation null makes it clearly significant (or clearly not).

    The members named (and so the share beyond chance the level reads) rise with ``strict``:
    share = strict - 0.2, so 0.1 reads low, 0.3 moderate, 0.6 high and 0.9 critical.
    """
    k = len(STATISTICS)
    null = torch.zeros(499, k) if leaking else torch.linspace(0, 2, 499)[:, None].repeat(1, k)
    chance = 15 / 16
    stat = 1.0 if leaking else 0.5
    return fh.Measurement(
        strict=strict, strict_low=strict - 0.05, strict_high=strict + 0.05,
        relaxed=1.0 if leaking else 0.5, relaxed_low=0.45, relaxed_high=1.0,
        chance_strict=0.178, chance_relaxed=0.588,
        auc=0.8, auc_low=0.75, auc_high=0.85, tpr_at_fpr={0.0: 0.2, 0.05: 0.4, 0.1: 0.5},
        strict_episode_low=strict - 0.02, strict_episode_high=strict + 0.02,
        relaxed_episode_low=0.45, relaxed_episode_high=1.0, auc_episode_low=0.78,
        auc_episode_high=0.82, members_named=chance + (strict - 0.2) * (15 - chance),
        chance_members_named=chance, members_named_relaxed=6.0,
        chance_members_named_relaxed=4.6875,
        statistics=dict.fromkeys(STATISTICS, stat), null=null,
        method="simpleshot", shots=5, queries=15, episodes=5, permutations=499,
    )


class ScriptedProbe(fh.FeSMIA):
    """A FeSMIA whose checks return prepared measurements, in order."""

    def __init__(self, script):
        super().__init__(episodes=5, permutations=499)
        self.script = list(script)

    def measure(self, model, canaries):
        strict, leaking = self.script.pop(0)
        return measured(strict, leaking)


def canaries():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    return fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))


def run(script, budget, **kwargs):
    monitor = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe(script), budget=budget, **kwargs)
    model = nn.Linear(4, 2)
    epochs_run = 0
    for epoch in range(len(script)):
        epochs_run += 1
        monitor.step(model, epoch=epoch)
        if monitor.should_stop:
            break
    return monitor, epochs_run


def test_level_ceiling_stops_at_the_first_crossing():
    script = [(0.1, True), (0.3, False), (0.3, True), (0.6, True)]
    monitor, epochs = run(script, fh.LeakageBudget(max_level="low"))
    assert epochs == 3 and monitor.stopped_epoch == 2
    assert monitor.stop_reason is fh.StopReason.LEVEL_EXCEEDED
    assert [r.level.value for r in monitor.history] == ["low", "none", "moderate"]
    assert monitor.history[-1].breached and monitor.history[-1].action == "stop"
    assert "exceeds the budget 'low'" in monitor.stop_message


def test_no_alarm_on_a_reading_that_is_not_significant():
    monitor, epochs = run([(0.9, False)] * 4, fh.LeakageBudget(max_level="none"))
    assert not monitor.should_stop and epochs == 4
    assert all(r.level is fh.Level.NONE for r in monitor.history)


def test_value_ceiling():
    budget = fh.LeakageBudget(max_level=None, max_values={"log_mia_strict": 0.45})
    monitor, epochs = run([(0.4, True), (0.5, True)], budget)
    assert epochs == 2 and monitor.stop_reason is fh.StopReason.VALUE_EXCEEDED
    assert "log_mia_strict = 0.5 exceeds the budget 0.45" in monitor.stop_message


def test_patience_needs_consecutive_crossings():
    script = [(0.6, True), (0.1, True), (0.6, True), (0.6, True), (0.6, True)]
    monitor, epochs = run(script, fh.LeakageBudget(max_level="moderate", patience=2))
    assert monitor.stopped_epoch == 3 and epochs == 4


def test_min_checks_delays_any_breach():
    monitor, epochs = run([(0.9, True)] * 5, fh.LeakageBudget(max_level="low", min_checks=3))
    assert monitor.stopped_epoch == 2


def test_alert_does_not_stop_and_calls_on_breach():
    seen = []
    budget = fh.LeakageBudget(
        max_level="low", action="alert", on_breach=lambda r, d: seen.append((r.epoch, d.reason))
    )
    monitor, epochs = run([(0.6, True)] * 3, budget)
    assert epochs == 3 and not monitor.should_stop
    assert seen == [(e, fh.StopReason.LEVEL_EXCEEDED) for e in range(3)]
    assert [r.action for r in monitor.history] == ["alert"] * 3


def test_raise_raises_with_the_report():
    with pytest.raises(fh.PrivacyBudgetExceeded, match="privacy budget exceeded at check 2") as err:
        run([(0.1, True), (0.9, True)], fh.LeakageBudget(max_level="moderate", action="raise"))
    assert err.value.report.level is fh.Level.CRITICAL


def test_cadence_every_n_epochs_and_steps():
    monitor = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe([(0.1, False)] * 10),
                                every_n_epochs=3)
    model = nn.Linear(4, 2)
    checked = [e for e in range(9) if monitor.step(model, epoch=e) is not None]
    assert checked == [2, 5, 8]
    assert monitor.step(model, epoch=8) is None  # the same epoch is never checked twice
    by_step = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe([(0.1, False)] * 10),
                                every_n_steps=4)
    assert [s for s in range(1, 13) if by_step.step(model, step=s) is not None] == [4, 8, 12]


def test_restore_safe_weights_loads_the_last_weights_within_budget():
    model = nn.Linear(4, 2)
    monitor = fh.PrivacyMonitor(
        canaries(), probe=ScriptedProbe([(0.1, True), (0.9, True)]),
        budget=fh.LeakageBudget(max_level="low"), restore_safe_weights=True,
    )
    monitor.step(model, epoch=0)
    safe = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    monitor.step(model, epoch=1)
    assert monitor.should_stop
    assert all(torch.equal(safe[k], v) for k, v in model.state_dict().items())


def test_state_dict_round_trip_continues_history_and_counters(tmp_path):
    script = [(0.1, True), (0.1, False), (0.3, True), (0.3, True)]
    budget = fh.LeakageBudget(max_level="low", patience=2)
    first = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe(script[:2]), budget=budget)
    model = nn.Linear(4, 2)
    for e in range(2):
        first.step(model, epoch=e)
    state = json.loads(json.dumps(first.state_dict()))  # plain values only
    resumed = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe(script[2:]), budget=budget)
    resumed.load_state_dict(state)
    assert resumed.checks == 2 and len(resumed.history) == 2
    assert resumed.step(model, epoch=1) is None  # already checked before the restart
    resumed.step(model, epoch=2)
    resumed.step(model, epoch=3)
    assert resumed.should_stop and resumed.stopped_epoch == 3
    assert [r.check for r in resumed.history] == [1, 2, 3, 4]
    older = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe([]), budget=budget)
    older.load_state_dict({"version": 1, "history": state["history"]})  # an older, smaller state
    assert older.checks == 2 and older.streak == 0


def test_a_run_saved_with_another_statistic_says_which_to_go_on_with():
    earlier = "auc+strict"  # say, an earlier default
    first = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe([(0.1, False)]), statistic=earlier)
    first.step(nn.Linear(4, 2), epoch=0)
    state = json.loads(json.dumps(first.state_dict()))
    with pytest.raises(fh.ConfigurationError,
                       match="build the monitor with statistic='auc\\+strict' to go on"):
        fh.PrivacyMonitor(canaries(), probe=ScriptedProbe([])).load_state_dict(state)
    probe = ScriptedProbe([(0.3, True)])
    assert "auc" not in probe.null_statistics  # the default reads no episode statistic
    resumed = fh.PrivacyMonitor(canaries(), probe=probe, statistic=earlier)
    resumed.load_state_dict(state)
    assert {"auc", "strict"} <= probe.null_statistics
    assert resumed.step(nn.Linear(4, 2), epoch=1).statistic == earlier


def test_a_failing_check_warns_and_is_recorded(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            return "no logits"

    monitor = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=5, permutations=9),
                                log_dir=tmp_path, tensorboard=False)
    with pytest.warns(UserWarning, match="check failed at epoch 0 and was skipped: ProbeError"):
        assert monitor.step(Broken(), epoch=0) is None
    assert monitor.errors[0]["error"].startswith("ProbeError: the model's output holds no logits")
    header, line = map(json.loads, (tmp_path / "privacy_history.jsonl").read_text().splitlines())
    assert header["record"] == "run" and header["run_id"] == line["run_id"] == monitor.run_id
    assert line["error"].startswith("ProbeError") and line["epoch"] == 0
    strict = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=5, permutations=9),
                               on_error="raise")
    with pytest.raises(fh.ProbeError):
        strict.step(Broken(), epoch=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_level": "huge"}, "`max_level` must be one of 'none', 'low', 'moderate', 'high', "
                                "'critical', got 'huge'"),
        ({"max_level": "critical"}, "'critical' can never be exceeded"),
        ({"max_level": None}, "needs `max_level` or `max_values`, got neither"),
        ({"max_values": {"auc": "high"}}, "must map report keys to numbers, got 'auc': 'high'"),
        ({"max_values": [0.5]}, "must be a mapping of report keys to numbers, got list"),
        ({"max_values": {"aucc": 0.5}}, "`max_values` key 'aucc' is not a leakage reading"),
        ({"patience": 0}, "`patience` must be a positive int, got 0"),
        ({"min_checks": -2}, "`min_checks` must be a positive int, got -2"),
        ({"action": "pause"}, "`action` must be one of 'alert', 'stop', 'raise', got 'pause'"),
        ({"on_breach": [print, 3]}, "`on_breach` must hold callables, got int"),
    ],
)
def test_budget_argument_errors(kwargs, message):
    with pytest.raises(fh.ConfigurationError, match=message):
        fh.LeakageBudget(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_epochs": 0}, "`every_n_epochs` must be a positive int, got 0"),
        ({"every_n_epochs": None}, "give a cadence"),
        ({"every_n_steps": -5}, "`every_n_steps` must be a positive int, got -5"),
        ({"on_error": "ignore"}, "`on_error` must be one of 'warn', 'raise', got 'ignore'"),
        ({"probe": "simpleshot"}, r"`probe` must be a FeSMIA \(or have check_canaries, "
                                  r"measure and settings\), got str"),
        ({"alpha": 0.0}, r"`alpha` must be a number in \(0, 1\), got 0.0"),
        ({"horizon": 0}, "`horizon` must be a positive int, got 0"),
        ({"bands": (0.2, 0.4)}, "`bands` must be a LevelBands or None, got tuple"),
        ({"sinks": fh.NullSink()}, "`sinks` must be a sequence of sinks, got a single NullSink"),
        ({"budget": "moderate"}, "`budget` must be a LeakageBudget or None, got str"),
        ({"sinks": [object()]}, r"each sink needs log\(report, step\) and close\(\), got object"),
    ],
)
def test_monitor_argument_errors(kwargs, message):
    with pytest.raises(fh.ConfigurationError, match=message):
        fh.PrivacyMonitor(canaries(), **kwargs)


def test_monitor_needs_a_canary_set():
    with pytest.raises(fh.ConfigurationError,
                       match="`canaries` must be a CanarySet or SequenceCanarySet, got tuple"):
        fh.PrivacyMonitor((torch.zeros(3), torch.zeros(3)))


def test_history_file_after_a_crash_and_resume_has_no_duplicates_or_gaps(tmp_path):
    script = [(0.1, False)] * 6
    first = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe(script), log_dir=tmp_path,
                              tensorboard=False)
    model = nn.Linear(4, 2)
    first.step(model, epoch=0)
    first.step(model, epoch=1)
    saved = first.state_dict()  # the checkpoint is taken after epoch 1 ...
    first.step(model, epoch=2)  # ... the run crashes after writing check 3
    first.flush()
    with open(tmp_path / "privacy_history.jsonl", "a") as fh_:
        fh_.write('{"check": 4, "epo')  # and a line cut short
    resumed = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe(script), log_dir=tmp_path,
                                tensorboard=False)
    resumed.load_state_dict(saved)
    for epoch in range(2, 5):
        resumed.step(model, epoch=epoch)
    resumed.flush()
    lines = [json.loads(s) for s in (tmp_path / "privacy_history.jsonl").read_text().splitlines()]
    assert lines[0]["record"] == "run" and lines[0]["run_id"] == first.run_id
    lines = lines[1:]
    assert [d["check"] for d in lines] == [1, 2, 3, 4, 5]
    assert {d["run_id"] for d in lines} == {first.run_id}
    aside = tmp_path / "privacy_history.jsonl.unreadable"
    assert aside.read_text() == '{"check": 4, "epo\n'  # moved aside, not deleted
    assert [d["epoch"] for d in lines] == [0, 1, 2, 3, 4]


def test_non_finite_outputs_fail_the_check_not_the_run():
    class Exploded(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    monitor = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=5, permutations=9))
    with pytest.warns(UserWarning, match="non-finite signals"):
        assert monitor.step(Exploded(), epoch=0) is None
    assert monitor.checks == 0 and "non-finite" in monitor.errors[0]["error"]
    assert monitor.step(nn.Linear(4, 2), epoch=1) is not None  # the next check runs


def test_only_leakage_readings_can_be_budgeted():
    for key in ("p_value", "shots", "seconds_attack", "chance_strict"):
        with pytest.raises(fh.ConfigurationError, match=f"'{key}' is not a leakage reading"):
            fh.LeakageBudget(max_values={key: 0.5})
    fh.LeakageBudget(max_values={"auc_low": 0.7, "tpr_at_fpr_0": 0.2, "members_named": 3,
                                 "share_beyond_chance": 0.2})


def test_float64_canaries_from_numpy_are_read_by_a_float32_model():
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)), rng.integers(0, 2, 64)  # what NumPy and sklearn give
    canary_set = fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))
    model = nn.Linear(4, 2)  # float32
    monitor = fh.PrivacyMonitor(canary_set, probe=fh.FeSMIA(episodes=5, permutations=9))
    assert monitor.preflight(model) is not None
    assert monitor.step(model, epoch=0) is not None and monitor.errors == []


def test_a_binary_classifiers_single_logit_is_read_as_two_classes():
    torch.manual_seed(0)
    one = nn.Linear(4, 1)  # trained with BCEWithLogitsLoss: p(1) = sigmoid(z)
    two = nn.Linear(4, 2)
    with torch.no_grad():  # the same model with logits [0, z]
        two.weight.copy_(torch.cat([torch.zeros(1, 4), one.weight]))
        two.bias.copy_(torch.cat([torch.zeros(1), one.bias]))
    probe = fh.FeSMIA(episodes=5, permutations=9)
    a, b = probe.features_of(one, canaries()), probe.features_of(two, canaries())
    torch.testing.assert_close(a.signals, b.signals)


def test_a_model_that_cannot_read_the_canaries_fails_the_preflight_not_every_check():
    model = nn.Linear(5, 2)  # the canaries have 4 features
    monitor = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=5, permutations=9))
    with pytest.raises(fh.ProbeError, match="pre-flight check could not run the model"):
        monitor.preflight(model)
    lenient = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=5, permutations=9),
                                preflight="warn")
    with pytest.warns(UserWarning, match="check failed before training"):
        assert lenient.preflight(model) is None
    with pytest.warns(UserWarning) as caught:  # each failed check says where: each is shown
        for epoch in range(3):
            lenient.step(model, epoch=epoch)
    assert [w for w in caught if "at epoch 2" in str(w.message)]


def test_step_without_an_epoch_or_a_step_and_a_second_loop_are_told():
    monitor = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe([(0.1, False)] * 4))
    model = nn.Linear(4, 2)
    with pytest.raises(fh.ConfigurationError, match="needs the epoch that just ended"):
        monitor.step(model)
    monitor.step(model, epoch=0)
    monitor.step(model, epoch=1)
    with pytest.warns(UserWarning, match="already checked in this run.*monitor.reset"):
        monitor.step(model, epoch=0)  # a second fold's loop, say
    monitor.reset()
    assert monitor.step(model, epoch=0) is not None


def test_a_model_mixing_floating_dtypes_gets_the_canaries_as_they_are():
    class Mixed(nn.Module):  # a float64 temperature declared before a float32 layer
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones((), dtype=torch.float64))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) / self.temperature.float()

    monitor = fh.PrivacyMonitor(canaries(), probe=fh.FeSMIA(episodes=5, permutations=9))
    assert monitor.preflight(Mixed()) is not None


def test_a_step_repeated_by_gradient_accumulation_is_not_a_new_loop():
    import warnings

    monitor = fh.PrivacyMonitor(canaries(), probe=ScriptedProbe([(0.1, False)] * 4),
                                every_n_steps=2)
    model = nn.Linear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for micro_batch in range(8):  # four micro-batches per optimizer step
            monitor.step(model, step=micro_batch // 4 + 1)
    assert [r.step for r in monitor.history] == [2]


def test_a_batch_of_one_squeezed_to_its_classes_is_refused_clearly():
    from fesmia_hooks.signals import classification_signals

    with pytest.raises(fh.ProbeError, match=r"must be \[batch, classes\], got \(3,\)"):
        classification_signals(torch.randn(3), torch.tensor([1]), ["log_prob"])
