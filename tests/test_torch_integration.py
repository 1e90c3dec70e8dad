"""Plain-torch adapter: an optimizer step hook drives the core monitor in a hand-written loop."""

from __future__ import annotations

import copy
import doctest
import json

import pytest
import torch
from _history import RecordingSink, checks_in, headers_in, readings  # noqa: E402
from torch import nn

import fesmia_hooks
from fesmia_hooks import FeSMIA, LeakageBudget, PrivacyBudgetExceeded, StopReason
from fesmia_hooks.demos.digits import digits_mlp, load_noisy_digits
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.integrations import torch as torch_integration
from fesmia_hooks.integrations.torch import AttachedMonitor, PrivacyMonitor, attach
from fesmia_hooks.report import Level
from fesmia_hooks.sinks import HISTORY_FILE

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def task():
    return load_noisy_digits(members=100, seed=0)


def small_probe(seed: int = 0) -> FeSMIA:
    return FeSMIA(episodes=20, permutations=99, seed=seed)


def train(model, optimizer, data, steps: int, *, batch: int = 32, watch=None) -> int:
    """Take ``steps`` optimizer steps over shuffled batches (global RNG); stop if asked."""
    x, y = data
    taken = 0
    while taken < steps:
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            if taken == steps:
                break
            idx = order[i : i + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            taken += 1
            if watch is not None and watch.should_stop:
                return taken
    return taken


def setup(task, *, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_checks_run_at_every_nth_optimizer_step(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=5)
    watch = attach(model, optimizer, monitor)
    assert isinstance(watch, AttachedMonitor) and watch.monitor is monitor and watch.attached
    train(model, optimizer, task.train, 23)
    assert watch.steps == 23
    assert [r.step for r in monitor.history] == [5, 10, 15, 20]
    assert [r.check for r in monitor.history] == [1, 2, 3, 4]
    assert all(r.epoch is None for r in monitor.history)
    assert watch.last_report is monitor.history[-1]
    assert not watch.should_stop and watch.stop_reason is StopReason.NOT_STOPPED
    assert "steps=23" in repr(watch) and "every_n_steps=5" in repr(watch)


def test_history_and_tensorboard_use_the_optimizer_step(task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, optimizer = setup(task)
    with PrivacyMonitor(
        task.canaries, probe=small_probe(), every_n_steps=4, log_dir=tmp_path
    ) as monitor, attach(model, optimizer, monitor):
        train(model, optimizer, task.train, 12)
    lines = checks_in(tmp_path / HISTORY_FILE)
    assert [(d["check"], d["step"], d["global_step"]) for d in lines] == [
        (1, 4, 4), (2, 8, 8), (3, 12, 12)
    ]
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    events = acc.Scalars("privacy/log_mia_strict")
    assert [e.step for e in events] == [4, 8, 12]
    assert [e.value for e in events] == pytest.approx([d["log_mia_strict"] for d in lines])


def test_attach_switches_a_fresh_epoch_monitor_to_the_step_cadence(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe())  # every_n_epochs=1
    assert monitor.every_n_epochs == 1 and monitor.every_n_steps is None
    watch = attach(model, optimizer, monitor, every_n_steps=3)
    assert monitor.every_n_steps == 3 and monitor.every_n_epochs is None
    train(model, optimizer, task.train, 7)
    assert [r.step for r in monitor.history] == [3, 6]
    assert monitor.step(model, epoch=0) is None  # the epoch cadence is off now
    watch.remove()


def test_an_agreeing_cadence_is_accepted(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=4)
    with attach(model, optimizer, monitor, every_n_steps=4) as watch:
        train(model, optimizer, task.train, 4)
    assert watch.steps == 4 and len(monitor.history) == 1


def test_remove_stops_counting_and_checking(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=5)
    watch = attach(model, optimizer, monitor)
    train(model, optimizer, task.train, 5)
    assert len(monitor.history) == 1
    watch.remove()
    assert not watch.attached
    train(model, optimizer, task.train, 12)
    assert watch.steps == 5 and len(monitor.history) == 1
    watch.remove()  # a second remove is harmless
    assert "removed" in repr(watch)


def test_context_manager_removes_the_hook_on_exit(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=2)
    with attach(model, optimizer, monitor) as watch:
        train(model, optimizer, task.train, 3)
        assert watch.attached
    assert not watch.attached
    train(model, optimizer, task.train, 5)
    assert watch.steps == 3 and [r.step for r in monitor.history] == [2]


def test_start_step_continues_the_count(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=5)
    with attach(model, optimizer, monitor, start_step=8) as watch:
        train(model, optimizer, task.train, 2)
    assert watch.steps == 10 and [r.step for r in monitor.history] == [10]


# Settings that leak for real: 100 members, half the labels random, one check after 200
# full-batch Adam steps. Measured on model seeds 0-3 x probe seeds 0-2: strict 0.66-0.81,
# relaxed >= 0.98, p = 0.01 (the smallest possible with 99 permutations), so the level is
# "high" or "critical"; the tests below assert it on the report itself.
LEAKY_STEPS = 200


@pytest.fixture(scope="module")
def leaky_task():
    return load_noisy_digits(members=100, label_noise=0.5, seed=0)


def leaky_run(leaky_task, action: str):
    model, optimizer = setup(leaky_task, hidden=256)
    budget = LeakageBudget(max_level="low", action=action)
    monitor = PrivacyMonitor(
        leaky_task.canaries, probe=small_probe(), budget=budget, every_n_steps=LEAKY_STEPS,
        horizon=1,
    )
    return model, optimizer, monitor


def test_action_raise_propagates_out_of_optimizer_step(leaky_task):
    model, optimizer, monitor = leaky_run(leaky_task, "raise")
    x, y = leaky_task.train
    watch = attach(model, optimizer, monitor)
    in_step = False
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exceeded at check 1") as info:
        for _ in range(LEAKY_STEPS + 50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            in_step = True
            optimizer.step()
            in_step = False
    assert in_step, "the exception must come out of optimizer.step()"
    report = info.value.report
    assert report.step == LEAKY_STEPS == watch.steps
    assert report.significant and report.p_value <= report.p_threshold
    assert report.level > Level.LOW and report.strict > report.chance_strict
    assert report.breached and report.action == "raise"
    assert watch.should_stop and watch.stop_reason is StopReason.LEVEL_EXCEEDED
    watch.remove()


def test_action_stop_sets_should_stop_for_the_loop(leaky_task):
    model, optimizer, monitor = leaky_run(leaky_task, "stop")
    with attach(model, optimizer, monitor) as watch:
        taken = train(
            model, optimizer, leaky_task.train, 2 * LEAKY_STEPS, batch=1000, watch=watch
        )
    assert taken == LEAKY_STEPS and watch.should_stop
    assert watch.stop_reason is StopReason.LEVEL_EXCEEDED
    assert monitor.history[-1].level > Level.LOW and monitor.stopped_step == LEAKY_STEPS


def test_the_hook_leaves_training_bit_identical(task):
    """Dropout (global RNG), BatchNorm (running stats) and shuffling must not see the probe."""

    def run(with_monitor: bool):
        torch.manual_seed(3)
        model = nn.Sequential(
            nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 10)
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        monitor = None
        if with_monitor:
            monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=2)
            attach(model, optimizer, monitor)
        train(model, optimizer, task.train, 20)
        return model, optimizer, monitor

    plain, plain_opt, _ = run(False)
    watched, watched_opt, monitor = run(True)
    assert monitor is not None and len(monitor.history) == 10  # the probe really ran
    assert watched.training and all(m.training for m in watched.modules())
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for pa, pb in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)
    state_a, state_b = plain_opt.state_dict()["state"], watched_opt.state_dict()["state"]
    for key in state_a:
        for field in state_a[key]:
            assert torch.equal(torch.as_tensor(state_a[key][field]),
                               torch.as_tensor(state_b[key][field])), (key, field)


def test_rng_stream_after_training_is_the_same(task):
    def run(with_monitor: bool) -> torch.Tensor:
        torch.manual_seed(5)
        model = digits_mlp(16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if with_monitor:
            monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=3)
            attach(model, optimizer, monitor)
        train(model, optimizer, task.train, 6)
        return torch.rand(4)

    assert torch.equal(run(False), run(True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "net"}, r"`model` must be a torch.nn.Module, got str"),
        ({"optimizer": object()}, r"`optimizer` must be a torch.optim.Optimizer, got object"),
        ({"monitor": 3}, r"`monitor` must be a fesmia_hooks.PrivacyMonitor, got int"),
        ({"every_n_steps": 0}, r"`every_n_steps` must be a positive int, got 0"),
        ({"every_n_steps": 2.5}, r"`every_n_steps` must be a positive int, got 2.5"),
        ({"start_step": -1}, r"`start_step` must be an int >= 0, got -1"),
    ],
)
def test_validators(task, kwargs, message):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=5)
    args = {"model": model, "optimizer": optimizer, "monitor": monitor, **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        attach(args.pop("model"), args.pop("optimizer"), args.pop("monitor"), **args)


def test_an_epoch_monitor_needs_a_step_cadence(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_epochs=2)
    with pytest.raises(ConfigurationError, match=r"attach\(\) checks by optimizer steps: .*"
                       r"every_n_epochs=2 \(or call monitor.step\(model, epoch=e\)"):
        attach(model, optimizer, monitor)
    assert monitor.every_n_epochs == 2  # left as it was


def test_a_disagreeing_cadence_is_rejected(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=5)
    with pytest.raises(ConfigurationError,
                       match=r"`every_n_steps` must agree with the monitor's every_n_steps=5, "
                             r"got 7"):
        attach(model, optimizer, monitor, every_n_steps=7)


def test_an_epoch_monitor_that_has_checked_is_not_switched(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe())
    monitor.step(model, epoch=0)
    with pytest.raises(ConfigurationError, match=r"cannot switch a monitor that has already "
                       r"checked by epochs to `every_n_steps=3`"):
        attach(model, optimizer, monitor, every_n_steps=3)
    assert monitor.every_n_epochs == 1 and monitor.every_n_steps is None


def test_privacy_monitor_alias_is_the_core_class():
    assert torch_integration.PrivacyMonitor is fesmia_hooks.PrivacyMonitor


def test_module_docstring_example_runs():
    result = doctest.testmod(torch_integration, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- the run-start rule


def full_batch(model, optimizer, data, steps: int) -> None:
    """``steps`` full-batch steps: the same updates whatever the global RNG holds."""
    x, y = data
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_each_attach_starts_a_new_run(leaky_task, tmp_path):
    model, optimizer = setup(leaky_task, hidden=256)
    monitor = PrivacyMonitor(
        leaky_task.canaries, probe=small_probe(), budget=LeakageBudget(max_level="low"),
        every_n_steps=LEAKY_STEPS // 2, horizon=2, log_dir=tmp_path,
    )
    with attach(model, optimizer, monitor) as watch:
        full_batch(model, optimizer, leaky_task.train, LEAKY_STEPS)
    first = monitor.run_id
    assert [(r.check, r.step) for r in monitor.history] == [(1, 100), (2, 200)]
    assert watch.should_stop and monitor.stopped_step is not None  # it leaks by step 200
    with attach(model, optimizer, monitor) as watch:
        assert monitor.run_id != first and monitor.history == [] and monitor.checks == 0
        assert not watch.should_stop and watch.stop_reason is StopReason.NOT_STOPPED
        assert monitor.stopped_step is None and watch.stop_message == ""
        full_batch(model, optimizer, leaky_task.train, LEAKY_STEPS // 2)
    assert [(r.check, r.step) for r in monitor.history] == [(1, 100)]
    history = tmp_path / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(history)] == [first, monitor.run_id]
    assert [(line["run_id"], line["check"]) for line in checks_in(history)] == [
        (first, 1), (first, 2), (monitor.run_id, 1)]


def test_attach_after_load_state_dict_continues_the_run(task, tmp_path):
    def fresh(log_dir, **kwargs):
        model, optimizer = setup(task)
        monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=4,
                                 log_dir=log_dir, **kwargs)
        return model, optimizer, monitor

    # uninterrupted: 16 steps, checks at 4, 8, 12, 16
    model, optimizer, reference = fresh(tmp_path / "reference")
    with attach(model, optimizer, reference, total_steps=16):
        full_batch(model, optimizer, task.train, 16)
    # interrupted: a checkpoint at step 8 (model, optimizer, monitor), then the job dies
    # after the check at step 12
    sink = RecordingSink()
    model, optimizer, monitor = fresh(tmp_path / "run", sinks=[sink])
    with attach(model, optimizer, monitor, total_steps=16):
        full_batch(model, optimizer, task.train, 8)
        checkpoint = copy.deepcopy({  # as torch.save would: not the live tensors
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "privacy": json.loads(json.dumps(monitor.state_dict())), "step": 8})
        full_batch(model, optimizer, task.train, 4)
    run_id = monitor.run_id
    assert [r.step for r in monitor.history] == [4, 8, 12]
    # resumed in a new process: new objects, the checkpoint loaded, attached at its step
    sink = RecordingSink()
    model, optimizer, monitor = fresh(tmp_path / "run", sinks=[sink])
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    monitor.load_state_dict(checkpoint["privacy"])
    with attach(model, optimizer, monitor, start_step=checkpoint["step"],
                total_steps=99) as watch:  # a run that continues keeps its state's horizon
        assert monitor.run_id == run_id and monitor.calibration.horizon == 4
        full_batch(model, optimizer, task.train, 8)
    assert watch.steps == 16 and monitor.run_id == run_id
    assert [(r.check, r.step) for r in monitor.history] == [(1, 4), (2, 8), (3, 12), (4, 16)]
    assert [readings(r) for r in monitor.history] == [readings(r) for r in reference.history]
    assert sink.calls[0] == ("resume", run_id, 2) and sink.logged() == [(3, 12), (4, 16)]
    history = tmp_path / "run" / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(history)] == [run_id]
    assert [(line["check"], line["step"]) for line in checks_in(history)] == [
        (1, 4), (2, 8), (3, 12), (4, 16)]
    # the state is used once: attaching again is a new run
    attach(model, optimizer, monitor).remove()
    assert monitor.run_id != run_id and monitor.history == []


def test_a_loaded_state_needs_a_start_step_past_its_last_check(task):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=4)
    with attach(model, optimizer, monitor):
        full_batch(model, optimizer, task.train, 8)
    monitor.load_state_dict(monitor.state_dict())
    with pytest.raises(ConfigurationError, match=r"continues a loaded state whose last check "
                       r"was at optimizer step 8: pass start_step >= 8 .*got start_step=0"):
        attach(model, optimizer, monitor)
    assert monitor.restored  # nothing began: the state still waits for its run
    attach(model, optimizer, monitor, start_step=8).remove()
    assert monitor.checks == 2 and not monitor.restored


@pytest.mark.parametrize(("start_step", "total_steps", "horizon", "expected"), [
    (0, 23, None, 4),   # checks at 5, 10, 15, 20
    (0, 4, None, 1),    # no check would fall in the run: at least one
    (8, 23, None, 3),   # a new run from step 8: checks at 10, 15, 20
    (0, 23, 7, 7),      # a horizon fixed by the monitor wins
    (0, None, None, None),
])
def test_total_steps_sets_the_horizon_of_a_new_run(task, start_step, total_steps, horizon,
                                                   expected):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=5,
                             horizon=horizon)
    attach(model, optimizer, monitor, start_step=start_step, total_steps=total_steps).remove()
    assert monitor.calibration.horizon == expected


def test_attach_keeps_the_monitors_folder_and_tensorboard_choice(task, tmp_path):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=4,
                             log_dir=tmp_path, tensorboard=False)
    with attach(model, optimizer, monitor):
        full_batch(model, optimizer, task.train, 8)
    monitor.close()
    assert [line["step"] for line in checks_in(tmp_path / HISTORY_FILE)] == [4, 8]
    assert not list(tmp_path.glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------- sinks
def test_a_ready_monitors_sinks_receive_the_attached_checks(task, tmp_path):
    sink = RecordingSink()
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=4,
                             sinks=[sink], log_dir=tmp_path)
    with attach(model, optimizer, monitor):
        full_batch(model, optimizer, task.train, 12)
    first = monitor.run_id
    assert sink.calls == [("start_run", first), ("log", 1, 4), ("log", 2, 8), ("log", 3, 12)]
    with attach(model, optimizer, monitor):  # a new run: a new header for the same sink
        full_batch(model, optimizer, task.train, 4)
    assert sink.calls[4:] == [("start_run", monitor.run_id), ("log", 1, 4)]
    monitor.close()
    assert sink.calls[-1] == ("close",)


def test_only_rank_zero_writes(task, tmp_path, monkeypatch):
    monkeypatch.setattr(torch_integration, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 1)
    sink = RecordingSink()
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=4,
                             sinks=[sink], log_dir=tmp_path / "privacy")
    with attach(model, optimizer, monitor):
        full_batch(model, optimizer, task.train, 8)
    assert [r.step for r in monitor.history] == [4, 8]  # every rank checks
    assert sink.calls == [] and not (tmp_path / "privacy").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"total_steps": 0}, r"`total_steps` must be a positive int, got 0"),
    ({"start_step": 10, "total_steps": 5}, r"`total_steps` is the step the run ends at, "
                                           r"counted from 0: it must be >= start_step=10, got 5"),
])
def test_total_steps_is_validated(task, kwargs, message):
    model, optimizer = setup(task)
    monitor = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=5)
    with pytest.raises(ConfigurationError, match=message):
        attach(model, optimizer, monitor, **kwargs)
