"""The Keras 3 adapter, in short real ``fit`` runs on the torch backend."""

from __future__ import annotations

import csv
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
pytest.importorskip("sklearn")
if keras.backend.backend() != "torch":  # pragma: no cover - depends on the environment
    pytest.skip("the Keras adapter runs on KERAS_BACKEND=torch", allow_module_level=True)

from _history import checks_in  # noqa: E402

from fesmia_hooks import (  # noqa: E402
    CanarySet,
    ConfigurationError,
    FeSMIA,
    LeakageBudget,
    PrivacyBudgetExceeded,
    StopReason,
)
from fesmia_hooks.demos.digits import load_noisy_digits  # noqa: E402
from fesmia_hooks.integrations.keras import PrivacyMonitor  # noqa: E402
from fesmia_hooks.sinks import HISTORY_FILE, scalar_metrics  # noqa: E402

STRICT = "privacy/log_mia_strict"

# A setting that leaks within a few epochs: half the labels are noise, a wide MLP, a high lr.
LEAKY = {"label_noise": 0.5, "hidden": 512, "lr": 1e-2, "epochs": 15, "seed": 0}


def leaky_budget(action="stop"):
    return LeakageBudget(max_level="low", action=action)


# horizon fixed, so that runs of any length spend alpha alike and can be compared
LEAKY_HORIZON = LEAKY["epochs"]


def small_probe() -> FeSMIA:
    return FeSMIA(episodes=20, permutations=99)


@pytest.fixture(scope="module")
def task():
    return load_noisy_digits(seed=0)


@pytest.fixture(scope="module")
def leaky_task():
    return load_noisy_digits(seed=0, label_noise=LEAKY["label_noise"])


def arrays(task):
    x, y = task.train
    return x.numpy(), y.numpy()


def mlp(*, hidden=64, lr=1e-3, seed=0, dropout=False):
    keras.backend.clear_session()  # same layer and variable names in every run
    keras.utils.set_random_seed(seed)
    layers = [keras.Input(shape=(64,)), keras.layers.Dense(hidden, activation="relu")]
    if dropout:
        layers += [
            keras.layers.Dropout(0.3),  # draws from the global torch RNG
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3, seed=7),  # draws from a Keras SeedGenerator
        ]
    model = keras.Sequential([*layers, keras.layers.Dense(10)])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, task, callbacks, epochs):
    x, y = arrays(task)
    return model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=callbacks)


def leaky_model():
    return mlp(hidden=LEAKY["hidden"], lr=LEAKY["lr"], seed=LEAKY["seed"])


class WeightsAtEpochEnd(keras.callbacks.Callback):
    """Placed before the monitor: the weights each epoch ended with, before any check."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([w.copy() for w in self.model.get_weights()])


@pytest.fixture(scope="module")
def stop_run(leaky_task):
    """One leaky run with a stopping budget and restore_safe_weights (read by several tests)."""
    model = leaky_model()
    recorder = WeightsAtEpochEnd()
    privacy = PrivacyMonitor(
        leaky_task.canaries,
        probe=small_probe(),
        budget=leaky_budget(),
        horizon=LEAKY_HORIZON,
        restore_safe_weights=True,
    )
    history = fit(model, leaky_task, [recorder, privacy], LEAKY["epochs"])
    return {
        "model": model,
        "privacy": privacy,
        "history": history.history,
        "epoch_weights": recorder.weights,
        "final_weights": [w.copy() for w in model.get_weights()],
        "reports": list(privacy.history),
        "stop_training": model.stop_training,
        "stopped_epoch": privacy.stopped_epoch,
        "stop_reason": privacy.stop_reason,
        "stop_message": privacy.stop_message,
        "should_stop": privacy.should_stop,
    }


# ---------------------------------------------------------------------- 1. logs and History
def test_history_and_csv_logger_hold_the_privacy_keys(task, tmp_path):
    budget = LeakageBudget(max_level="high", action="alert")  # no horizon: taken from fit
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), budget=budget)
    path = tmp_path / "log.csv"
    history = fit(mlp(), task, [privacy, keras.callbacks.CSVLogger(str(path))], epochs=3)

    assert [r.epoch for r in privacy.history] == [0, 1, 2]
    assert privacy.monitor.calibration.horizon == 3
    keys = scalar_metrics(privacy.history[0])
    assert STRICT in keys and "privacy/log_mia_relaxed" in keys and "privacy/auc" in keys
    for key in keys:
        assert key in history.history, key
        expected = [scalar_metrics(r)[key] for r in privacy.history]
        assert history.history[key] == pytest.approx(expected, nan_ok=True), key
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert [float(row[STRICT]) for row in rows] == pytest.approx(
        [r.strict for r in privacy.history]
    )


def test_only_checked_epochs_carry_the_keys(task):
    seen = []
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_epochs=2)
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(STRICT in logs)
    )
    history = fit(mlp(), task, [privacy, spy], epochs=4)

    assert seen == [False, True, False, True]
    assert [r.epoch for r in privacy.history] == [1, 3]
    assert history.history[STRICT] == pytest.approx([r.strict for r in privacy.history])
    assert privacy.monitor.calibration.horizon == 2  # alpha spent over epochs // every_n_epochs


# ---------------------------------------------------------------------- 2. TensorBoard
def test_tensorboard_events_hold_the_documented_tags(task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), log_dir=log_dir)
    fit(mlp(), task, [privacy], epochs=3)

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    documented = {k for k, v in scalar_metrics(privacy.history[0]).items() if math.isfinite(v)}
    assert {STRICT, "privacy/log_mia_relaxed", "privacy/chance_strict", "privacy/p_value",
            "privacy/level_index"} <= documented
    assert documented <= set(tags["scalars"])
    for tag in documented:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2], tag
        expected = [scalar_metrics(r)[tag] for r in privacy.history]
        assert [e.value for e in events] == pytest.approx(expected, rel=1e-6, abs=1e-6), tag
    assert {"privacy/scores/members", "privacy/scores/non_members"} <= set(tags["histograms"])
    assert any(t.startswith("privacy/summary") for t in tags["tensors"])

    lines = checks_in(log_dir / HISTORY_FILE)
    assert [line["log_mia_strict"] for line in lines] == pytest.approx(
        [r.strict for r in privacy.history]
    )
    assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------- 3. budget
def test_a_crossed_budget_stops_fit_at_the_breach_epoch(stop_run):
    history, reports, stopped = stop_run["history"], stop_run["reports"], stop_run["stopped_epoch"]

    assert stop_run["should_stop"] and stop_run["stop_training"]
    assert stop_run["stop_reason"] is StopReason.LEVEL_EXCEEDED
    assert "privacy budget exceeded" in stop_run["stop_message"]
    assert [r.epoch for r in reports if r.breached] == [stopped]
    assert reports[-1].breached and reports[-1].level.value not in ("none", "low")
    ran = len(history["loss"])
    assert ran == stopped + 1 < LEAKY["epochs"]
    assert len(history[STRICT]) == ran
    assert history["privacy/breached"] == [0.0] * (ran - 1) + [1.0]


def test_restore_safe_weights_loads_the_last_weights_within_budget(stop_run):
    stopped = stop_run["stopped_epoch"]
    assert stopped >= 1
    assert not stop_run["reports"][stopped - 1].breached
    final, at = stop_run["final_weights"], stop_run["epoch_weights"]
    for got, want in zip(final, at[stopped - 1], strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(g, w) for g, w in zip(final, at[stopped], strict=True))


def test_alert_does_not_stop(leaky_task, stop_run):
    privacy = PrivacyMonitor(
        leaky_task.canaries,
        probe=small_probe(),
        budget=leaky_budget("alert"),
        horizon=LEAKY_HORIZON,
    )
    epochs = stop_run["stopped_epoch"] + 3
    history = fit(leaky_model(), leaky_task, [privacy], epochs)

    assert len(history.history["loss"]) == epochs
    assert not privacy.should_stop and privacy.stopped_epoch is None
    assert privacy.stop_reason is StopReason.NOT_STOPPED
    breached = [r.epoch for r in privacy.history if r.breached]
    # same seeds, same run: the alert fires where the stopping budget stopped
    assert breached and breached[0] == stop_run["stopped_epoch"]


def test_raise_propagates_out_of_fit(leaky_task, stop_run):
    privacy = PrivacyMonitor(
        leaky_task.canaries,
        probe=small_probe(),
        budget=leaky_budget("raise"),
        horizon=LEAKY_HORIZON,
    )
    model = leaky_model()
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exceeded") as info:
        fit(model, leaky_task, [privacy], LEAKY["epochs"])
    assert info.value.report.epoch == stop_run["stopped_epoch"]
    assert model.stop_training and privacy.stopped_epoch == info.value.report.epoch


# ---------------------------------------------------------------------- 4. EarlyStopping
def test_keras_early_stopping_placed_after_sees_the_key(task):
    privacy = PrivacyMonitor(task.canaries, probe=small_probe())
    stopper = keras.callbacks.EarlyStopping(monitor=STRICT, mode="max", patience=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(mlp(), task, [privacy, stopper], epochs=3)
    assert not [w for w in caught if "Early stopping conditioned" in str(w.message)]
    values = [r.strict for r in privacy.history]
    assert stopper.best == pytest.approx(max(values))
    assert stopper.best_epoch == int(np.argmax(values))


# ---------------------------------------------------------------------- 5. a second fit
@pytest.mark.filterwarnings("ignore:restore_safe_weights")
def test_a_second_fit_starts_clean(leaky_task, stop_run):
    model, privacy = stop_run["model"], stop_run["privacy"]
    assert privacy.monitor.checks == stop_run["stopped_epoch"] + 1 > 2
    at_begin = {}

    def record(logs=None):
        at_begin.update(
            should_stop=privacy.should_stop, reason=privacy.stop_reason,
            stopped=privacy.stopped_epoch, history=len(privacy.history),
            checks=privacy.monitor.checks, errors=len(privacy.monitor.errors),
        )  # fmt: skip

    spy = keras.callbacks.LambdaCallback(on_train_begin=record)
    history = fit(model, leaky_task, [privacy, spy], epochs=2)

    assert at_begin == {"should_stop": False, "reason": StopReason.NOT_STOPPED,
                        "stopped": None, "history": 0, "checks": 0, "errors": 0}
    ran = len(history.history["loss"])
    assert [r.epoch for r in privacy.history] == list(range(ran))
    assert [r.check for r in privacy.history] == list(range(1, ran + 1))
    assert privacy.monitor.calibration.horizon == LEAKY["epochs"]  # the monitor's fixed horizon


# ---------------------------------------------------------------------- 6. no side effects
def training_state(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"opt/{v.path}": torch.as_tensor(np.array(v)) for v in
                  model.optimizer.variables})
    return state


def test_the_probe_does_not_change_training(task):
    def run(with_monitor):
        model = mlp(dropout=True, seed=3)
        callbacks = [PrivacyMonitor(task.canaries, probe=small_probe())] if with_monitor else []
        fit(model, task, callbacks, epochs=3)
        return training_state(model), callbacks

    watched, callbacks = run(True)
    plain, _ = run(False)
    assert len(callbacks[0].history) == 3
    assert watched.keys() == plain.keys()
    assert any("seed_generator" in k for k in watched)  # the Keras RNG state is compared too
    for key in watched:
        assert torch.equal(watched[key], plain[key]), key


class TrainingSpy(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def call(self, x, training=None):
        self.seen.append(bool(training))
        return x


class DefaultsToTraining(keras.Model):
    """A model whose call defaults to training=True: Keras would run it in training mode."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.spy = TrainingSpy()
        self.out = keras.layers.Dense(10)

    def call(self, x, training=True):
        return self.out(self.spy(self.hidden(x)))


def test_the_probe_calls_the_model_with_training_false(task):
    keras.utils.set_random_seed(0)
    model = DefaultsToTraining()
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    per_epoch = []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: model.spy.seen.clear(),
        on_epoch_end=lambda epoch, logs: per_epoch.append(list(model.spy.seen)),
    )
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), on_error="raise")
    fit(model, task, [privacy, spy], epochs=2)

    batches = -(-len(task.train[0]) // 32)
    # the training steps, then one probe forward (128 canaries, one batch) in inference mode
    assert per_epoch == [[True] * batches + [False]] * 2
    assert len(privacy.history) == 2


def test_embedding_layer_uses_the_keras_model_names(task):
    keras.utils.set_random_seed(0)
    model = DefaultsToTraining()
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    probe = FeSMIA(episodes=20, permutations=99, features="both", embedding_layer="hidden")
    privacy = PrivacyMonitor(task.canaries, probe=probe, on_error="raise")
    fit(model, task, [privacy], epochs=1)
    assert len(privacy.history) == 1 and not privacy.monitor.errors


# ---------------------------------------------------------------------- 7. validators
def test_refuses_another_backend(task, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    with pytest.raises(
        ConfigurationError, match=r"needs the 'torch' backend, got 'tensorflow'.*KERAS_BACKEND"
    ):
        PrivacyMonitor(task.canaries)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be a positive int, got 0"),
        ({"every_n_epochs": None}, r"give a cadence: `every_n_epochs` or `every_n_steps`"),
        ({"every_n_epochs": 1.0}, r"`every_n_epochs` must be a positive int, got 1.0"),
        ({"restore_safe_weights": "yes"}, r"`restore_safe_weights` must be a bool, got 'yes'"),
        ({"log_dir": 3}, r"`log_dir` must be a path \(str or os.PathLike\) or None, got int"),
        ({"on_error": "ignore"}, r"`on_error` must be one of 'warn', 'raise', got 'ignore'"),
        ({"probe": "fesmia"}, r"`probe` must be a FeSMIA \(or have check_canaries, measure and "
                              r"settings\), got str"),
        ({"budget": 0.5}, r"`budget` must be a LeakageBudget or None, got float"),
    ],
)
def test_bad_arguments_are_refused(task, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        PrivacyMonitor(task.canaries, **kwargs)


def test_bad_canaries_are_refused():
    with pytest.raises(ConfigurationError, match=r"`canaries` must be a CanarySet, a SequenceCanarySet, a factory"):
        PrivacyMonitor((np.zeros((4, 64)), np.zeros(4)))


def test_a_model_that_is_not_a_torch_module_is_refused(task):
    privacy = PrivacyMonitor(task.canaries, probe=small_probe())
    privacy.set_model(object())
    with pytest.raises(ConfigurationError, match=r"must be a torch.nn.Module .*got object"):
        privacy.on_train_begin()


def test_too_few_canaries_for_the_probe_are_refused():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 64, generator=g), torch.randint(0, 10, (20,), generator=g)
    small = CanarySet(members=(x[:10], y[:10]), non_members=(x[10:], y[10:]))
    with pytest.raises(ValueError, match=r"FeSMIA\(shots=5, queries=15\)"):
        PrivacyMonitor(small)


# ---------------------------------------------------------------------- the demo
def test_keras_demo_runs_and_prints_one_row_per_check(tmp_path):
    from fesmia_hooks.demos.keras_demo import run_keras_demo

    lines = []
    monitor = run_keras_demo(log_dir=tmp_path / "demo", epochs=2, out=lines.append)
    rows = [line for line in lines if line.startswith("epoch ")]
    assert len(rows) == monitor.checks == len(monitor.history) >= 1
    assert rows[0].startswith("epoch   0  loss ") and "chance 0.18" in rows[0]
    assert lines[0].startswith("fesmia-hooks demo (Keras ")
    assert lines[-2].startswith(("stopped at epoch", "finished 2 epochs within budget"))
    assert f"{monitor.checks} checks in " in lines[-1]
    assert monitor.budget is not None and monitor.calibration.horizon == 2
    assert (tmp_path / "demo" / HISTORY_FILE).exists()


def test_keras_demo_refuses_keras_on_another_backend(monkeypatch):
    from fesmia_hooks.demos import keras_demo

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(
        ConfigurationError,
        match=r"the Keras demo needs the 'torch' backend, got 'jax' \(keras was imported",
    ):
        keras_demo.run_keras_demo(epochs=1, out=lambda line: None)
