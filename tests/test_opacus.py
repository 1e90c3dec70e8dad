"""Opacus end to end: DP-SGD watched by the monitor trains exactly as unwatched, and both ε
readings, the budget on the accountant's ε and the TensorBoard chart hold, in a plain loop
(fesmia_hooks.integrations.torch) and under Lightning (examples/dp_opacus.py)."""

import importlib.util
import math
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("opacus")
pytest.importorskip("sklearn")

from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.data_loader import DPDataLoader  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402

import fesmia_hooks as fh  # noqa: E402
from fesmia_hooks.exceptions import ConfigurationError  # noqa: E402
from fesmia_hooks.integrations.torch import attach  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dp_opacus.py"
EPOCHS = 4
TARGET = 8.0
DELTA = 1e-5
EPSILON_TAGS = ("privacy/epsilon_accountant", "privacy/epsilon_lower_bound")


def load_example():
    spec = importlib.util.spec_from_file_location("dp_opacus", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


class Pair(NamedTuple):
    framework: str
    folder: Path
    watched: object  # example.Run with the monitor
    plain: object  # the same training without it


@pytest.fixture(scope="module")
def _cache():
    return {}


def pair_of(framework, cache, factory) -> Pair:
    if framework == "lightning":
        pytest.importorskip("lightning.pytorch")
    if framework not in cache:
        folder = factory.mktemp(framework)
        watched = example.train(framework, TARGET, epochs=EPOCHS, log_dir=str(folder / "watched"))
        plain = example.train(framework, TARGET, monitor=False, epochs=EPOCHS,
                              log_dir=str(folder / "plain"))
        cache[framework] = Pair(framework, folder, watched, plain)
    return cache[framework]


@pytest.fixture(params=["torch", "lightning"])
def pair(request, _cache, tmp_path_factory):
    return pair_of(request.param, _cache, tmp_path_factory)


def rdp_epsilon(noise_multiplier, sample_rate, steps):
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant.get_epsilon(DELTA)


# ---------------------------------------------------------------------------- no side effects
def test_the_monitor_leaves_dp_training_bitwise_alone(pair):
    watched, plain = pair.watched, pair.plain
    assert watched.monitor is not None and plain.monitor is None
    assert len(watched.monitor.history) == EPOCHS  # it did check, every epoch
    # noise and Poisson batches come from torch's global RNG: any draw of the probe's, any
    # grad sample, hook or buffer it left behind would change the weights
    assert watched.weights.keys() == plain.weights.keys()
    for name, tensor in plain.weights.items():
        assert torch.equal(watched.weights[name], tensor), name
    # the accountant counted the same steps, no more (a check is no training step)
    steps = EPOCHS * watched.steps_per_epoch
    sigma, rate, counted = watched.engine.accountant.history[-1]
    assert watched.engine.accountant.history == plain.engine.accountant.history
    assert len(watched.engine.accountant.history) == 1 and counted == steps
    assert watched.engine.get_epsilon(DELTA) == plain.engine.get_epsilon(DELTA)
    # Opacus's Poisson sampling is what trained, under Lightning too (not a replaced sampler)
    for run in (watched, plain):
        assert isinstance(run.loader, DPDataLoader)
        assert isinstance(run.loader.batch_sampler, UniformWithReplacementSampler)
        assert run.loader.batch_sampler.sample_rate == rate == 1 / run.steps_per_epoch


def test_lightning_trains_exactly_the_plain_loops_weights(_cache, tmp_path_factory):
    # Same seed, same Opacus objects: Lightning draws the same Poisson batches and noise as
    # the hand-written loop, so it neither replaced the sampler nor drew random numbers.
    loop = pair_of("torch", _cache, tmp_path_factory).plain
    lightning = pair_of("lightning", _cache, tmp_path_factory).plain
    for name, tensor in loop.weights.items():
        assert torch.equal(lightning.weights[name], tensor), name


# ---------------------------------------------------------------------------- both ε readings
def test_every_check_reads_the_accountant_after_its_epoch_and_a_lower_bound_below_it(pair):
    run = pair.watched
    history = run.monitor.history
    sigma, rate, _ = run.engine.accountant.history[-1]
    accounted = [r.epsilon_accountant for r in history]
    assert all(math.isfinite(e) for e in accounted)
    assert all(a < b for a, b in zip(accounted, accounted[1:], strict=False))
    # each check read the ε of exactly the steps taken before it (its epoch's included)
    for epoch, report in enumerate(history):
        steps = (epoch + 1) * run.steps_per_epoch
        assert report.epsilon_accountant == pytest.approx(rdp_epsilon(sigma, rate, steps),
                                                          rel=1e-12)
        if pair.framework == "torch":
            assert report.step == steps
        else:
            assert report.epoch == epoch
    # the noise was sized to spend the target in EPOCHS epochs: the last check reads it
    assert TARGET - 0.1 < accounted[-1] <= TARGET
    assert accounted[-1] == run.engine.get_epsilon(DELTA)
    for report in history:
        assert 0.0 <= report.epsilon_lower_bound <= report.epsilon_accountant
        assert report.epsilon_confidence == 0.95 and report.epsilon_delta == DELTA


def test_the_audit_proves_a_positive_epsilon_of_the_same_training_without_dp(
        _cache, tmp_path_factory, tmp_path):
    private = pair_of("torch", _cache, tmp_path_factory).watched
    free = example.train("torch", 0.0, epochs=10, log_dir=str(tmp_path))
    assert free.engine is None and not isinstance(free.loader, DPDataLoader)
    history = free.monitor.history
    assert all(math.isnan(r.epsilon_accountant) for r in history)  # nothing to account
    assert history[-1].epsilon_lower_bound > 0.3  # memorised canaries prove a real ε (0.75)
    assert history[-1].epsilon_lower_bound > private.monitor.history[-1].epsilon_lower_bound


# ---------------------------------------------------------------------------- the budget
def test_a_budget_on_the_accountant_stops_at_the_first_check_above_it(pair, tmp_path):
    accounted = [r.epsilon_accountant for r in pair.watched.monitor.history]
    ceiling = (accounted[1] + accounted[2]) / 2  # passed at the third check
    budget = fh.LeakageBudget(None, max_values={"epsilon_accountant": ceiling}, action="stop")
    run = example.train(pair.framework, TARGET, epochs=EPOCHS, log_dir=str(tmp_path),
                        budget=budget)
    history = run.monitor.history
    assert [r.breached for r in history] == [False, False, True]
    assert run.monitor.should_stop
    assert run.monitor.stop_reason is fh.StopReason.VALUE_EXCEEDED
    assert [r.epsilon_accountant for r in history] == accounted[:3]
    # training ended at that check: three epochs, and no step past it was accounted
    assert run.epochs == 3
    assert run.engine.accountant.history[-1][2] == 3 * run.steps_per_epoch


# ---------------------------------------------------------------------------- TensorBoard
def test_tensorboard_holds_both_epsilons_and_their_chart(pair):
    history = pair.watched.monitor.history
    acc = EventAccumulator(str(pair.folder / "watched"),
                           size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in EPSILON_TAGS:
        key = tag.split("/")[1]
        values = [event.value for event in acc.Scalars(tag)]
        assert values == pytest.approx([getattr(r, key) for r in history], abs=1e-5), tag
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    charts = [chart for category in layout.category for chart in category.chart
              if any("epsilon" in pattern for pattern in chart.multiline.tag)]
    assert len(charts) == 1
    patterns = list(charts[0].multiline.tag)
    matches = [[tag for tag in tags if re.search(pattern, tag)] for pattern in patterns]
    assert all(len(m) == 1 for m in matches), matches  # anchored: one tag each
    assert sorted(m[0] for m in matches) == sorted(EPSILON_TAGS)


# ---------------------------------------------------------------------------- attach()
def _dp_setup(steps_per_epoch=4):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(192, 8, generator=g), torch.randint(0, 3, (192,), generator=g)
    canaries = fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:64], y[32:64]))
    model = nn.Linear(8, 3)
    loader = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=32 // steps_per_epoch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    return canaries, model, optimizer, engine, (x[:32], y[:32])


def _step(model, optimizer, data):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_attach_counts_the_steps_a_dp_optimizer_takes_and_not_the_skipped_ones():
    canaries, model, optimizer, engine, data = _dp_setup()
    monitor = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=20, permutations=99),
                                accountant=engine, delta=DELTA)
    with attach(model, optimizer, monitor, every_n_steps=2) as watch:
        for _ in range(3):
            _step(model, optimizer, data)
        optimizer.signal_skip_step(do_skip=True)  # a virtual step: clipped, not taken
        _step(model, optimizer, data)
        _step(model, optimizer, data)
    assert monitor.baseline is not None  # attaching began the run: its pre-flight check
    assert watch.steps == 4 == engine.accountant.history[-1][2]
    assert [r.step for r in monitor.history] == [2, 4]
    assert monitor.history[-1].epsilon_accountant == engine.get_epsilon(DELTA)
    assert monitor.history[0].epsilon_accountant < monitor.history[-1].epsilon_accountant


def test_attach_refuses_an_optimizer_without_step_hooks_before_starting_a_run():
    class Bare(torch.optim.Optimizer):
        def __init__(self):  # a wrapper that, like Opacus's, skips Optimizer.__init__
            self.original_optimizer = None

        def step(self, closure=None):
            return None

    canaries, model, *_ = _dp_setup()
    monitor = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=20, permutations=99))
    with pytest.raises(ConfigurationError, match="Bare has none and wraps no optimizer"):
        attach(model, Bare(), monitor, every_n_steps=1)
    assert monitor.baseline is None  # nothing began: no pre-flight check
