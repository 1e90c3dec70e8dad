"""The Keras 3 adapter, in short real ``fit`` runs on the torch backend."""

from __future__ import annotations

import csv
import math
import os
import re
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

from _history import checks_in, headers_in  # noqa: E402

from fesmia_hooks import (  # noqa: E402
    CanaryError,
    CanarySet,
    ConfigurationError,
    FeSMIA,
    LeakageBudget,
    PrivacyBudgetExceeded,
    StopReason,
)
from fesmia_hooks.demos.digits import load_noisy_digits  # noqa: E402
from fesmia_hooks.integrations.keras import (  # noqa: E402
    DEFAULT_LOG_KEYS,
    PrivacyMonitor,
    training_arrays,
)
from fesmia_hooks.report import scalar_keys  # noqa: E402
from fesmia_hooks.sinks import HISTORY_FILE, READ_WHEN_GIVEN, scalar_metrics  # noqa: E402

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


def fit(model, task, callbacks, epochs, **kwargs):
    x, y = arrays(task)
    kwargs.setdefault("verbose", 0)
    return model.fit(x, y, epochs=epochs, batch_size=32, callbacks=callbacks, **kwargs)


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
        log_keys=(*DEFAULT_LOG_KEYS, "breached"),
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
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), budget=budget, log_keys="all")
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


# ---------------------------------------------------------------------- 8. log_keys
def printed_keys(text):
    return set(re.findall(r"(privacy/[\w.]+):", text))


@pytest.mark.parametrize(
    ("log_keys", "expected"),
    [
        (None, {f"privacy/{k}" for k in DEFAULT_LOG_KEYS}),
        ("all", None),  # every scalar of the report
        (["auc", "privacy/p_value", "auc"], {"privacy/auc", "privacy/p_value"}),
        ([], set()),
    ],
    ids=["default", "all", "chosen", "none"],
)
def test_log_keys_choose_what_the_progress_bar_and_history_hold(task, tmp_path, capsys,
                                                                log_keys, expected):
    kwargs = {} if log_keys is None else {"log_keys": log_keys}
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), log_dir=tmp_path, **kwargs)
    history = fit(mlp(), task, [privacy], epochs=2, verbose=2)  # verbose=2: a line per epoch

    every = set(scalar_metrics(privacy.history[0]))
    # every scalar but the DP readings, which this run does not take (no accountant, no coins)
    assert len(every) == len(set(scalar_keys()) - set(READ_WHEN_GIVEN)) > 20
    if expected is None:
        expected = every
    printed = capsys.readouterr().out
    assert printed.count("loss:") == 2
    assert printed_keys(printed) == expected
    assert {k for k in history.history if k.startswith("privacy/")} == expected
    for key in expected:
        assert history.history[key] == pytest.approx(
            [scalar_metrics(r)[key] for r in privacy.history], nan_ok=True)
    # the history file (and TensorBoard) keep every key whatever log_keys says
    lines = checks_in(tmp_path / HISTORY_FILE)
    assert len(lines) == 2 and all(set(scalar_keys()) <= set(line) for line in lines)


def test_default_log_keys_are_few_and_known():
    assert set(DEFAULT_LOG_KEYS) <= set(scalar_keys())
    assert {"log_mia_strict", "log_mia_relaxed"} <= set(DEFAULT_LOG_KEYS)
    assert len(DEFAULT_LOG_KEYS) <= 6


@pytest.mark.parametrize(
    ("log_keys", "message"),
    [
        (["log_mia_strict", "privacy/nope", "accuracy"],
         r"`log_keys` has unknown key\(s\) \['privacy/nope', 'accuracy'\]; allowed: 'all' or "
         r"any of log_mia_strict, log_mia_strict_low, .*, breached \(with or without the "
         r"'privacy/' prefix\)"),
        ("auc", r"`log_keys` must be 'all' or a sequence of keys, got the string 'auc' "
                r"\(for one key, write \['auc'\]\)"),
        (3, r"`log_keys` must be 'all' or a sequence of keys, got int"),
        ([b"auc"], r"`log_keys` must hold strings, got a bytes"),
    ],
)
def test_bad_log_keys_are_refused(task, log_keys, message):
    with pytest.raises(ConfigurationError, match=message):
        PrivacyMonitor(task.canaries, log_keys=log_keys)


# ---------------------------------------------------------------------- 9. validation_split
def row_set(x):
    return {tuple(row) for row in np.asarray(x).tolist()}


class TrainedRows(keras.layers.Layer):
    """An identity layer that records every input row Keras trains on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = set()

    def call(self, x, training=None):
        if training and isinstance(x, torch.Tensor) and x.device.type != "meta":
            self.rows |= row_set(x.detach().cpu().numpy())
        return x


def recording_mlp():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    recorder = TrainedRows()
    model = keras.Sequential([keras.Input(shape=(64,)), recorder,
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, recorder


def test_validation_split_that_holds_out_members_is_refused(task):
    x, y = arrays(task)
    members = row_set(task.canaries.inputs[: task.canaries.num_members])
    held = sum(tuple(row) in members for row in x[225:].tolist())  # Keras keeps the last 75
    assert held > 0  # the members of CanarySet.split lie anywhere, the tail too

    privacy = PrivacyMonitor(task.canaries, probe=small_probe())
    model, recorder = recording_mlp()
    with pytest.raises(
        CanaryError,
        match=rf"^{held} of the 64 canary members are never trained on: validation_split=0.25 "
              r"holds out the last 75 rows of the training arrays \(before shuffling\) .*"
              r"training_arrays\(\(x, y\), canaries, validation_split=0.25\)$",
    ):
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, validation_split=0.25,
                  callbacks=[privacy])
    assert not recorder.rows and privacy.history == []  # refused before any training


def test_validation_split_is_refused_for_float64_canaries_of_any_values(task):
    # Keras turns float64 arrays into float32 before it splits: values that float32 cannot
    # hold exactly (not the digits' sixteenths) must still be found in the held-out tail.
    x, y = arrays(task)
    x = x + np.random.default_rng(0).normal(scale=1e-3, size=x.shape)  # float64 values
    (train_x, train_y), canaries = CanarySet.split((x, y), size=32, seed=0)
    train_x, train_y = train_x.numpy(), train_y.numpy()
    members = row_set(canaries.inputs[:32])
    assert sum(tuple(row) in members for row in train_x[-len(train_x) // 4:].tolist()) > 0
    privacy = PrivacyMonitor(canaries, probe=small_probe())
    model, _ = recording_mlp()
    with pytest.raises(CanaryError, match="canary members are never trained on"):
        model.fit(train_x, train_y, epochs=1, batch_size=32, verbose=0, validation_split=0.25,
                  callbacks=[privacy])


def test_training_arrays_keep_every_member_where_keras_trains(task, tmp_path):
    x, y = arrays(task)
    x_fit, y_fit = training_arrays(task.train, task.canaries, validation_split=0.25)

    # the same rows and labels, moved as little as possible: only held-out members swapped
    assert isinstance(x_fit, np.ndarray) and x_fit.dtype == x.dtype and y_fit.dtype == y.dtype
    pairs = sorted(zip(map(tuple, x.tolist()), y.tolist(), strict=True))
    assert sorted(zip(map(tuple, x_fit.tolist()), y_fit.tolist(), strict=True)) == pairs
    moved = int((x_fit != x).any(axis=1).sum())
    members = row_set(task.canaries.inputs[:64])
    held = sum(tuple(row) in members for row in x[225:].tolist())
    assert moved == 2 * held

    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), log_dir=tmp_path)
    model, recorder = recording_mlp()
    history = model.fit(x_fit, y_fit, epochs=2, batch_size=32, verbose=0,
                        validation_split=0.25, callbacks=[privacy])

    assert "val_loss" in history.history and len(privacy.history) == 2
    assert len(recorder.rows) == 225  # what Keras trained on: the first 75 %
    assert members <= recorder.rows  # every member
    assert not row_set(task.canaries.inputs[64:]) & recorder.rows  # and no non-member


def test_members_in_validation_data_are_refused_unless_trained_on(task):
    x, y = arrays(task)
    members = row_set(task.canaries.inputs[:64])
    is_member = np.array([tuple(row) in members for row in x.tolist()])
    privacy = PrivacyMonitor(task.canaries, probe=small_probe())

    # validated on and trained on: fine
    mlp().fit(x, y, epochs=1, verbose=0, validation_data=(x[is_member], y[is_member]),
              callbacks=[privacy])
    assert len(privacy.history) == 1
    # validated on instead of trained on: refused
    with pytest.raises(CanaryError, match=r"^10 of the 64 canary members are in validation_data "
                                          r"and not in the training arrays"):
        mlp().fit(x[~is_member | (np.cumsum(is_member) > 10)],
                  y[~is_member | (np.cumsum(is_member) > 10)], epochs=1, verbose=0,
                  validation_data=(x[is_member][:10], y[is_member][:10]), callbacks=[privacy])


def test_hooks_called_by_hand_do_not_look_for_a_fit(task):
    model = mlp()
    privacy = PrivacyMonitor(task.canaries, probe=small_probe())
    privacy.set_model(model)
    privacy.on_train_begin()  # no running fit: nothing to inspect, no error
    privacy.on_epoch_end(0, logs := {})
    assert STRICT in logs and len(privacy.history) == 1


def test_training_arrays_refusals(task):
    x, y = task.train
    canaries = task.canaries
    with pytest.raises(CanaryError, match=r"^1 of the 64 canary members are not in the "
                                          r"training arrays; members must be trained on \(rows are compared "
                                          r"exactly, as torch.float32\)$"):
        member = row_set(canaries.inputs[:1]).pop()
        keep = [tuple(row) != member for row in x.tolist()]
        training_arrays((x[keep], y[keep]), canaries)
    with pytest.raises(CanaryError, match=r"^2 rows of the training arrays are canary "
                                          r"non-members that Keras would train on"):
        training_arrays((torch.cat([canaries.inputs[64:66], x]),
                         torch.cat([canaries.labels[64:66], y])), canaries)
    # non-members in the held-out tail are never trained on: accepted
    xs, ys = training_arrays((torch.cat([x, canaries.inputs[64:66]]),
                              torch.cat([y, canaries.labels[64:66]])), canaries,
                             validation_split=0.1)
    assert len(xs) == len(ys) == 302
    # Keras's own split point: floor(300 * (1 - 0.9)) == 29 in floating point
    with pytest.raises(CanaryError, match=r"validation_split=0.9 leaves 29 of 300 rows to "
                                          r"train on, too few to hold the 64 rows"):
        training_arrays((x, y), canaries, validation_split=0.9)
    with pytest.raises(ConfigurationError, match=r"`validation_split` must be a number in "
                                                 r"\[0, 1\), got 1.0"):
        training_arrays((x, y), canaries, validation_split=1.0)
    with pytest.raises(ConfigurationError, match=r"must have one length, inputs first, got "
                                                 r"lengths \[300, 299\]"):
        training_arrays((x, y[:-1]), canaries)
    with pytest.raises(ConfigurationError, match=r"samples shaped \(64,\) like the canaries, "
                                                 r"got shape \(300, 8, 8\)"):
        training_arrays((x.reshape(-1, 8, 8), y), canaries)
    # every array aligned with the inputs is reordered alike; None passes through
    weights = np.arange(300.0)
    xw, yw, ww, none = training_arrays((x, y, weights, None), canaries, validation_split=0.25)
    assert none is None
    index = {tuple(row): i for i, row in enumerate(x.tolist())}
    assert ww.tolist() == [float(index[tuple(row)]) for row in xw.tolist()]


# ---------------------------------------------------------------------- 10. one-hot labels
def test_one_hot_labels_train_and_probe_as_keras_users_write_them(task):
    x, y = (t.numpy() for t in task.canaries.on("cpu"))
    one_hot = keras.utils.to_categorical(y, 10)  # float32 rows
    canaries = CanarySet(members=(x[:64], one_hot[:64]), non_members=(x[64:], one_hot[64:]),
                         num_classes=10)
    assert torch.equal(canaries.labels, task.canaries.labels)
    assert canaries.fingerprint() == task.canaries.fingerprint()

    x_train, y_train = arrays(task)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam",
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    privacy = PrivacyMonitor(canaries, probe=small_probe(), on_error="raise")
    model.fit(x_train, keras.utils.to_categorical(y_train, 10), epochs=2, verbose=0,
              callbacks=[privacy])
    assert len(privacy.history) == 2 and not privacy.monitor.errors


# ---------------------------------------------------------------------- 11. when a run starts
def test_a_second_fit_is_a_new_run_with_its_own_header(task, tmp_path):
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), log_dir=tmp_path)
    model = mlp()
    fit(model, task, [privacy], epochs=2)
    first = privacy.monitor.run_id
    fit(model, task, [privacy], epochs=3)
    second = privacy.monitor.run_id

    assert first != second
    assert [r.check for r in privacy.history] == [1, 2, 3]
    assert [r.epoch for r in privacy.history] == [0, 1, 2]
    assert privacy.monitor.calibration.horizon == 3
    path = tmp_path / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(path)] == [first, second]
    assert [(line["run_id"], line["check"]) for line in checks_in(path)] == [
        (first, 1), (first, 2), (second, 1), (second, 2), (second, 3)]


class SaveStateAt(keras.callbacks.Callback):
    """Placed after the monitor: once epoch ``epoch`` is checked, all a resumed run needs.

    The monitor's state, and what makes the rest of training the same: the weights and the
    optimizer's variables (the runs do not shuffle, so no RNG is needed).
    """

    def __init__(self, privacy, epoch):
        super().__init__()
        self.privacy, self.epoch, self.saved = privacy, epoch, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.saved = {
                "privacy": self.privacy.state_dict(),
                "weights": self.model.get_weights(),
                "optimizer": [np.array(v) for v in self.model.optimizer.variables],
            }

    @staticmethod
    def restore(model, saved):
        model.set_weights(saved["weights"])
        model.optimizer.build(model.trainable_variables)
        for variable, value in zip(model.optimizer.variables, saved["optimizer"], strict=True):
            variable.assign(value)


def test_a_loaded_state_continues_its_run(task, tmp_path):
    def monitor():  # no fixed horizon: the run's own, from its fit
        return PrivacyMonitor(task.canaries, probe=small_probe(), log_dir=tmp_path,
                              budget=LeakageBudget(max_level="high", action="alert"))

    whole = monitor()
    saver = SaveStateAt(whole, epoch=1)
    # the run, uninterrupted (not shuffled: the resumed epochs then train exactly alike)
    fit(mlp(), task, [whole, saver], epochs=4, shuffle=False)
    assert saver.saved["privacy"]["checks"] == 2

    resumed = monitor()  # as after a crash: a new callback, the saved state loaded
    resumed.load_state_dict(saver.saved["privacy"])
    model = mlp()
    SaveStateAt.restore(model, saver.saved)
    seen = {}
    spy = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: seen.update(checks=resumed.monitor.checks,
                                                run_id=resumed.monitor.run_id))
    fit(model, task, [resumed, spy], epochs=4, initial_epoch=2, shuffle=False)

    assert seen == {"checks": 2, "run_id": whole.monitor.run_id}
    assert resumed.monitor.run_id == whole.monitor.run_id
    assert [r.check for r in resumed.history] == [1, 2, 3, 4]
    assert [r.epoch for r in resumed.history] == [0, 1, 2, 3]
    assert resumed.monitor.calibration.horizon == whole.monitor.calibration.horizon == 4
    # the same training, so the same checks; and the run-level test, its thresholds
    # included, goes on as if nothing had happened
    assert [r.strict for r in resumed.history] == pytest.approx(
        [r.strict for r in whole.history])
    assert [r.p_value for r in resumed.history] == [r.p_value for r in whole.history]
    assert [r.p_threshold for r in resumed.history] == pytest.approx(
        [r.p_threshold for r in whole.history])
    # one run in the shared history: its header once, checks 3 and 4 made again
    path = tmp_path / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(path)] == [whole.monitor.run_id]
    lines = checks_in(path)
    assert [line["check"] for line in lines] == [1, 2, 3, 4]
    assert [line["log_mia_strict"] for line in lines] == pytest.approx(
        [r.strict for r in resumed.history])
    # and a later fit without a loaded state is a new run again
    fit(model, task, [resumed], epochs=1)
    assert resumed.monitor.run_id != whole.monitor.run_id
    assert len(headers_in(path)) == 2


# ---------------------------------------------------------------------- 12. sinks
class ListSink:
    def __init__(self):
        self.logged, self.closed = [], 0

    def log(self, report, step):
        self.logged.append((report, step))

    def close(self):
        self.closed += 1


def test_user_sinks_receive_every_check(task):
    sink = ListSink()
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), sinks=[sink], every_n_epochs=2,
                             log_keys=[])
    fit(mlp(), task, [privacy], epochs=6)

    assert len(privacy.history) == 3
    assert [report for report, _ in sink.logged] == privacy.history
    assert [step for _, step in sink.logged] == [1, 3, 5]  # a check's step is its epoch
    assert sink.closed == 1  # at the end of fit


# ---------------------------------------------------------------------- 13. every_n_steps
def test_every_n_steps_checks_on_batches_and_logs_each_epoch_its_own(task, tmp_path):
    sink = ListSink()
    privacy = PrivacyMonitor(task.canaries, probe=small_probe(), every_n_steps=15,
                             sinks=[sink], log_dir=tmp_path)
    at_epoch_end = []
    spy = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: at_epoch_end.append(
            {k: v for k, v in logs.items() if k.startswith("privacy/")}))
    history = fit(mlp(), task, [privacy, spy], epochs=4)  # 10 batches an epoch, 40 in all

    assert privacy.params["steps"] == 10
    assert [(r.step, r.epoch) for r in privacy.history] == [(15, 1), (30, 2)]
    assert [step for _, step in sink.logged] == [15, 30]
    assert [line["step"] for line in checks_in(tmp_path / HISTORY_FILE)] == [15, 30]
    assert privacy.monitor.calibration.horizon == 2  # 40 steps // 15
    # each epoch's logs hold the check made in it, and nothing when none was made
    first, second = (privacy.logged_scalars(r) for r in privacy.history)
    assert set(first) == {f"privacy/{k}" for k in DEFAULT_LOG_KEYS}
    assert at_epoch_end == [{}, first, second, {}]
    assert history.history[STRICT] == pytest.approx([r.strict for r in privacy.history])
