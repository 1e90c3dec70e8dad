"""Asynchronous checks: the attack runs beside training; its decision lands an epoch later."""

import pickle

import pytest
import torch
from test_faults import canaries, set_weights, unrelated_weights
from torch import nn

import fesmia_hooks as fh


def monitor(canary_set, **kwargs):
    kwargs.setdefault("budget", fh.LeakageBudget(action="stop"))
    return fh.PrivacyMonitor(canary_set, probe=fh.FeSMIA(episodes=30, permutations=99, seed=1),
                             horizon=4, tensorboard=False, **kwargs)


def readings(report):
    d = report.as_dict()
    return {k: v for k, v in d.items() if not k.startswith("seconds")}


def schedule(memorised):
    """Weights per epoch: unrelated, then memorising from epoch 2."""
    return [unrelated_weights(), unrelated_weights(), memorised, memorised]


def test_an_asynchronous_run_reads_and_decides_as_the_synchronous_one(tmp_path):
    canary_set, memorised = canaries()
    runs = {}
    for asynchronous in (False, True):
        model = nn.Linear(8, 3)
        mon = monitor(canary_set, asynchronous=asynchronous, log_dir=tmp_path / str(asynchronous))
        returned = []
        for epoch, weights in enumerate(schedule(memorised)):
            set_weights(model, weights)
            returned.append(mon.step(model, epoch=epoch))
            if mon.should_stop:
                break
        mon.close()
        runs[asynchronous] = (mon, returned)
    sync, sync_returned = runs[False]
    lazy, lazy_returned = runs[True]
    assert [readings(r) for r in lazy.history] == [readings(r) for r in sync.history]
    assert sync.stopped_epoch == lazy.stopped_epoch == 2  # the stop names the epoch it read
    # ... but the asynchronous decision reached the loop one epoch later
    assert [r is not None for r in sync_returned] == [True, True, True]
    assert lazy_returned[0] is None and [r.check for r in lazy_returned[1:]] == [1, 2, 3]
    lines = (tmp_path / "True" / "privacy_history.jsonl").read_text().count('"check"')
    assert lines == len(lazy.history)


def test_the_safe_weights_are_those_the_last_good_check_read():
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True, restore_safe_weights=True)
    good = unrelated_weights()
    set_weights(model, good)
    mon.step(model, epoch=0)  # read with `good`
    set_weights(model, memorised)  # training moves on before the attack is done
    mon.step(model, epoch=1)  # lands check 1 (within budget): keeps `good`, not these
    mon.step(model, epoch=2)  # lands check 2: over budget -> stop, restore
    assert mon.should_stop and mon.stopped_epoch == 1
    assert torch.equal(model.weight, good)


def test_a_state_saved_during_a_check_names_it_and_a_resumed_run_runs_it_again(tmp_path):
    # A checkpoint taken while a check runs does not wait for it (training goes on, this
    # run concludes it), but names it: a run resumed from it past that epoch would
    # otherwise never run it.
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, asynchronous=True, log_dir=tmp_path)
    assert mon.step(model, epoch=0) is None and mon.checks == 0
    state = mon.state_dict()
    assert mon._pending is not None  # not waited for
    assert state["checks"] == 0 and state["history"] == [] and state["checked"] == []
    assert state["running"] == {"mark": ["epoch", 0], "epoch": 0, "step": None}
    mon.step(model, epoch=1)  # this run concludes check 1 as usual
    assert [r.epoch for r in mon.history] == [0]
    mon.close()  # ... and close concludes check 2 before the sinks close
    assert mon.checks == 2
    lines = (tmp_path / "privacy_history.jsonl").read_text().count('"check"')
    assert lines == 2 and len(list(tmp_path.glob("events.out.tfevents.*"))) <= 1
    resumed = monitor(canary_set)
    resumed.load_state_dict(state)
    report = resumed.resume_check(model)  # on the restored weights, before training goes on
    assert report.check == 1 and report.epoch == 0 and resumed.resume_check(model) is None
    assert not resumed.is_due(epoch=0)


def test_a_breach_running_at_a_checkpoint_stops_the_run_resumed_from_it():
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised)
    mon = monitor(canary_set, asynchronous=True)
    mon.step(model, epoch=0)
    state = mon.state_dict()
    resumed = monitor(canary_set)
    resumed.load_state_dict(state)
    assert resumed.resume_check(model).breached
    assert resumed.should_stop and resumed.stopped_epoch == 0
    mon.close()


def test_the_adapters_check_starts_no_new_check_once_a_stop_landed():
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)
    set_weights(model, memorised)
    mon.check(model, epoch=0)
    landed = mon.check(model, epoch=1)  # lands the stop of epoch 0
    assert landed.breached and mon.should_stop and mon._pending is None
    assert [r.epoch for r in mon.history] == [0]


def test_an_interrupt_while_waiting_keeps_the_check_pending(monkeypatch):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)
    mon.step(model, epoch=0)
    future = mon._pending.future
    real = future.result
    real()  # the attack has finished, well: an interrupt now must not drop its check

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mon.step(model, epoch=1)
    monkeypatch.setattr(future, "result", real)
    assert mon._pending is not None and mon.checks == 0
    mon.flush()
    assert mon.checks == 1


def test_loading_a_state_over_a_running_check_drops_it_without_raising():
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True,
                  budget=fh.LeakageBudget(max_level="none", action="raise"))
    saved = mon.state_dict()
    set_weights(model, memorised)
    mon.step(model, epoch=0)  # would raise when concluded
    with pytest.warns(UserWarning, match="was not concluded"):
        mon.load_state_dict(saved)
    assert mon.checks == 0 and mon.is_due(epoch=0)


def test_a_copy_made_during_a_check_runs_it_again():
    import copy

    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)
    mon.step(model, epoch=0)
    for clone in (copy.deepcopy(mon), pickle.loads(pickle.dumps(mon))):
        assert clone._pending is None and clone.is_due(epoch=0)
    mon.close()
    assert mon.checks == 1


def test_a_failed_asynchronous_attack_is_a_failed_check(monkeypatch):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)

    def broken(*args, **kwargs):
        raise RuntimeError("the attack broke")

    monkeypatch.setattr(mon.probe, "attack", broken)
    mon.step(model, epoch=0)
    with pytest.warns(UserWarning, match="check failed at epoch 0 and was skipped: RuntimeError"):
        mon.flush()
    assert mon.checks == 0 and mon.errors[0]["error"] == "RuntimeError: the attack broke"


def test_asynchronous_checks_need_a_probe_that_runs_no_user_code():
    canary_set, _ = canaries()
    with pytest.raises(fh.ConfigurationError, match="asynchronous=True needs a probe"):
        fh.PrivacyMonitor(canary_set, probe=fh.FeSMIA(method="laplacianshot"),
                          asynchronous=True)
    with pytest.raises(fh.ConfigurationError, match="asynchronous"):
        fh.PrivacyMonitor(canary_set, asynchronous="yes")


def test_training_is_the_same_with_and_without_asynchronous_checks():
    canary_set, _ = canaries()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    finals = []
    for asynchronous in (None, False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = None if asynchronous is None else fh.PrivacyMonitor(
            canary_set, probe=fh.FeSMIA(episodes=20, permutations=99), budget=None,
            asynchronous=asynchronous)
        for epoch in range(3):
            for i in range(0, 64, 16):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
                opt.step()
            if mon is not None:
                mon.step(model, epoch=epoch)
        if mon is not None:
            mon.close()
        finals.append([p.detach().clone() for p in model.parameters()])
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other, strict=True))


def test_an_asynchronous_monitor_pickles_between_checks():
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)
    mon.step(model, epoch=0)
    mon.flush()
    copy = pickle.loads(pickle.dumps(mon))
    copy.step(model, epoch=1)
    copy.close()
    assert copy.checks == 2


def test_an_attached_asynchronous_monitor_checks_every_n_steps_and_lands_every_check():
    from fesmia_hooks.integrations.torch import attach

    canary_set, _ = canaries()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor(canary_set, asynchronous=True, every_n_steps=2)
    with attach(model, opt, mon, total_steps=8):
        for _ in range(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert [r.step for r in mon.history] == [2, 4, 6, 8]  # the last one landed on remove()


def test_the_last_check_is_concluded_at_exit_when_nobody_closed_the_monitor(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch, fesmia_hooks as fh
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(128, 8, generator=g), torch.randint(0, 3, (128,), generator=g)
        canaries = fh.CanarySet(members=(x[:64], y[:64]), non_members=(x[64:], y[64:]))
        mon = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=20, permutations=99),
                                log_dir={str(tmp_path)!r}, tensorboard=False,
                                asynchronous=True, horizon=3)
        model = torch.nn.Linear(8, 3)
        for epoch in range(3):
            mon.step(model, epoch=epoch)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "privacy_history.jsonl").read_text().count('"check"')
    assert lines == 3


def test_a_flush_from_another_thread_concludes_the_check_once():
    import threading

    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)
    mon.step(model, epoch=0)
    other = threading.Thread(target=mon.flush)
    other.start()
    mon.step(model, epoch=1)
    other.join()
    mon.close()
    assert [r.check for r in mon.history] == [1, 2] and mon.budget.checks == 2


def test_close_closes_the_sinks_even_when_the_last_check_raises():
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    closed = []

    class Sink:
        def log(self, report, step):
            pass

        def close(self):
            closed.append(True)

    mon = monitor(canary_set, asynchronous=True, sinks=[Sink()],
                  budget=fh.LeakageBudget(max_level="none", action="raise"))
    set_weights(model, memorised)
    mon.step(model, epoch=0)
    with pytest.raises(fh.PrivacyBudgetExceeded):
        mon.close()
    assert closed == [True]


def test_an_attached_monitor_stops_the_step_after_the_check_not_the_next_check():
    from fesmia_hooks.integrations.torch import attach

    canary_set, memorised = canaries()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Linear(8, 3)
    set_weights(model, memorised)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay memorised
    mon = monitor(canary_set, asynchronous=True, every_n_steps=5)
    steps = 0
    with attach(model, opt, mon, total_steps=20):
        while not mon.should_stop and steps < 20:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
    assert mon.stopped_step == 5 and steps == 6  # read at step 5, landed at step 6


def test_an_exit_raised_by_the_attack_is_raised_once_and_the_monitor_goes_on(monkeypatch):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, asynchronous=True)
    real = mon.probe.attack

    def exiting(*args, **kwargs):
        raise SystemExit(3)

    monkeypatch.setattr(mon.probe, "attack", exiting)
    mon.step(model, epoch=0)
    with pytest.raises(SystemExit):
        mon.flush()
    monkeypatch.setattr(mon.probe, "attack", real)
    assert mon.step(model, epoch=1) is None  # not raised again: the check was dropped
    mon.close()
    assert [r.epoch for r in mon.history] == [1]


def test_a_new_run_records_the_check_the_last_one_left_running(tmp_path):
    # A fit that failed (Keras, Transformers: no hook runs) leaves its last check running;
    # the next run records it in the history it belongs to, acting on nothing.
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised)
    mon = monitor(canary_set, asynchronous=True, log_dir=tmp_path, restore_safe_weights=True)
    mon.step(model, epoch=0)
    old_run = mon.run_id
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped with a warning
        mon.reset()
    assert not mon.should_stop and mon.history == [] and mon.run_id != old_run
    mon.close()
    from fesmia_hooks.history import load_runs

    [run] = load_runs(tmp_path)
    assert run.run_id == old_run and [r["breached"] for r in run.records] == [True]


def test_an_integration_resumed_from_a_checkpoint_runs_the_check_it_held_running():
    from fesmia_hooks.integrations.torch import attach

    canary_set, memorised = canaries()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Linear(8, 3)
    set_weights(model, memorised)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def train(steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    first = monitor(canary_set, asynchronous=True, every_n_steps=2)
    with attach(model, opt, first, total_steps=8):
        train(2)  # the check of step 2 starts ...
        state = first.state_dict()  # ... and the checkpoint is saved: then the node dies
    assert state["running"] == {"mark": ["step", 2], "epoch": None, "step": 2}
    assert state["checks"] == 0
    resumed = monitor(canary_set, asynchronous=True, every_n_steps=2)
    resumed.load_state_dict(state)
    with attach(model, opt, resumed, start_step=2, total_steps=8):
        train(1)  # the check of step 2, run again at the start, lands here: stop
        assert resumed.should_stop and resumed.stopped_step == 2
    assert [r.step for r in resumed.history] == [2]


def test_a_state_saved_after_training_moved_on_cannot_hold_the_running_check():
    # The checkpoint's weights are no longer those the check read: running it again on
    # them would file later weights' leakage under the earlier epoch.
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)
    mon.step(model, epoch=0)
    assert mon.state_dict()["running"] == {"mark": ["epoch", 0], "epoch": 0, "step": None}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()  # training goes on before the checkpoint
    assert mon.state_dict()["running"] is None
    mon.close()


def test_a_step_check_run_again_keeps_its_epoch_and_a_bad_call_keeps_it_due():
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True, every_n_steps=5)
    mon.step(model, epoch=1, step=10)
    state = mon.state_dict()
    mon.close()
    resumed = monitor(canary_set, every_n_steps=5)
    resumed.load_state_dict(state)
    with pytest.raises(fh.ConfigurationError, match="needs the restored model"):
        resumed.resume_check(None)
    report = resumed.resume_check(model)  # still due after the refused call
    assert (report.epoch, report.step, report.check) == (1, 10, 1)


@pytest.mark.parametrize("running", [["epoch", 0], {"mark": ["epoch", float("inf")],
                                                    "epoch": 0, "step": None},
                                     {"mark": ["week", 1], "epoch": 0, "step": None},
                                     {"mark": ["epoch", True], "epoch": 0, "step": None},
                                     {"mark": ["epoch", 1], "epoch": -1, "step": None}])
def test_a_malformed_running_check_is_refused_and_changes_nothing(running):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    mon = monitor(canary_set, asynchronous=True)
    mon.step(model, epoch=0)
    state = mon.state_dict()
    with pytest.raises(fh.ConfigurationError, match="not a monitor's state"):
        mon.load_state_dict({**state, "running": running})
    assert mon._pending is not None  # the check running here is left alone
    mon.close()
    assert mon.checks == 1


def test_a_stopped_run_resumed_starts_no_new_check():
    from fesmia_hooks.integrations.torch import attach

    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised)
    first = monitor(canary_set, every_n_steps=1)
    first.step(model, step=1)
    assert first.should_stop
    resumed = monitor(canary_set, every_n_steps=1)
    resumed.load_state_dict(first.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with attach(model, opt, resumed, start_step=1, total_steps=4):
        for _ in range(2):
            opt.step()
    assert [r.step for r in resumed.history] == [1]
