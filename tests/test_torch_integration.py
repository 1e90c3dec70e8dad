"""Plain-torch adapter: an optimizer step hook drives the core monitor in a hand-written loop."""

from __future__ import annotations

import doctest

import pytest
import torch
from _history import checks_in  # noqa: E402
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
