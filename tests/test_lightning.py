"""The Lightning adapter, in short real runs on the noisy digits (CPU, a few epochs)."""

from __future__ import annotations

import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("sklearn")

from _history import checks_in, headers_in, readings  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from fesmia_hooks import (  # noqa: E402
    ConfigurationError,
    FeSMIA,
    LeakageBudget,
    PrivacyBudgetExceeded,
    StopReason,
)
from fesmia_hooks.cli import main as fesmia_hooks_cli  # noqa: E402
from fesmia_hooks.demos.digits import load_noisy_digits  # noqa: E402
from fesmia_hooks.integrations.lightning import PrivacyMonitor  # noqa: E402
from fesmia_hooks.sinks import HISTORY_FILE  # noqa: E402

# A victim that memorises fast: every label is random, so only memorisation fits it; 128
# samples (64 of them canary members) seen twice per epoch. It leaks well before epoch 4.
MEMBERS, REPEAT, BATCH = 128, 2, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: extra intra-op threads only spin, and on a busy machine they
    # make each step orders of magnitude slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _task():
    return load_noisy_digits(members=MEMBERS, label_noise=1.0, seed=0)


def _loader(*, shuffle: bool = True) -> DataLoader:
    x, y = _task().train
    data = TensorDataset(x.repeat(REPEAT, 1), y.repeat(REPEAT))
    return DataLoader(data, batch_size=BATCH, shuffle=shuffle)


STEPS_PER_EPOCH = MEMBERS * REPEAT // BATCH  # 16


class DigitsModule(pl.LightningModule):
    """A small MLP classifier; optional BatchNorm and Dropout for the side-effect test."""

    def __init__(self, hidden: int = 512, lr: float = 3e-3, *, noisy_layers: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, hidden)]
        if noisy_layers:
            layers += [nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.3)]
        else:
            layers += [nn.ReLU()]
        layers.append(nn.Linear(hidden, 10))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class RankRecorder(pl.Callback):
    """Writes what each rank saw at the end of training to ``folder/rank<r>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        mon = next(cb for cb in trainer.callbacks if isinstance(cb, PrivacyMonitor))
        record = {
            "current_epoch": trainer.current_epoch,
            "should_stop": trainer.should_stop,
            "stopped_epoch": mon.stopped_epoch,
            "stop_reason": mon.stop_reason.value,
            "checks": mon.monitor.checks,
            "sinks": len(mon.monitor.sinks),
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordingSink:
    """A user's sink: keeps ``(check, epoch, step)`` of every report it is given."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, int | None, int]] = []
        self.closed = 0

    def log(self, report, step: int) -> None:
        self.logged.append((report.check, report.epoch, step))

    def close(self) -> None:
        self.closed += 1


class RankFileSink:
    """A user's sink under DDP: appends each check it is given to ``folder/sink-rank<r>.txt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def log(self, report, step: int) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(Path(self.folder, f"sink-rank{rank}.txt"), "a") as fh:
            fh.write(f"{report.check}\n")

    def close(self) -> None:
        pass


class StopAfterEpoch(pl.Callback):
    """Ends ``fit`` after epoch ``epoch`` (an interruption: the run's limits are unchanged)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _probe() -> FeSMIA:
    return FeSMIA(episodes=20, permutations=199, seed=0)


def _monitor(**kwargs) -> PrivacyMonitor:
    kwargs.setdefault("probe", _probe())
    return PrivacyMonitor(_task().canaries, **kwargs)


def _trainer(tmp_path: Path, *, max_epochs: int, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", TensorBoardLogger(tmp_path))
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        **kwargs,
    )


def _fit(tmp_path: Path, monitor: PrivacyMonitor | None, *, max_epochs: int, extra=(),
         model: pl.LightningModule | None = None, **kwargs) -> tuple[pl.Trainer, pl.LightningModule]:
    pl.seed_everything(0, verbose=False)
    model = model if model is not None else DigitsModule()
    callbacks = ([monitor] if monitor is not None else []) + list(extra)
    trainer = _trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model, _loader())
    return trainer, model


def _events(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------- 1 and 2
def test_metrics_reach_callback_metrics_and_tensorboard_once(tmp_path):
    monitor = _monitor()
    trainer, _ = _fit(tmp_path, monitor, max_epochs=2)
    assert [r.epoch for r in monitor.history] == [0, 1]
    last = monitor.history[-1]

    # 1. every scalar of the report is in callback_metrics with the last check's value
    for key in ("privacy/log_mia_strict", "privacy/log_mia_relaxed", "privacy/p_value",
                "privacy/p_threshold", "privacy/auc", "privacy/level_index"):
        assert key in trainer.callback_metrics, key
    assert float(trainer.callback_metrics["privacy/log_mia_strict"]) == pytest.approx(
        last.strict, abs=1e-6
    )
    assert float(trainer.callback_metrics["privacy/p_value"]) == pytest.approx(
        last.p_value, abs=1e-6
    )

    # 2. one event file, holding scalars (each once per check), histograms, PR curve, text
    log_dir = Path(trainer.logger.log_dir)
    assert len(list(log_dir.glob("events.out.tfevents*"))) == 1
    acc = _events(log_dir)
    tags = acc.Tags()
    privacy_scalars = [t for t in tags["scalars"] if t.startswith("privacy/")]
    assert {"privacy/log_mia_strict", "privacy/log_mia_relaxed", "privacy/p_value",
            "privacy/chance_strict", "privacy/level_index"} <= set(privacy_scalars)
    for tag in privacy_scalars:
        events = acc.Scalars(tag)
        assert len(events) == 2, (tag, [(e.step, e.value) for e in events])
        assert len({e.step for e in events}) == 2
    strict = [e.value for e in acc.Scalars("privacy/log_mia_strict")]
    assert strict == pytest.approx([r.strict for r in monitor.history], abs=1e-6)
    chance = [e.value for e in acc.Scalars("privacy/chance_strict")]
    assert chance == pytest.approx([0.1780] * 2, abs=1e-4)
    for tag in ("privacy/scores/members", "privacy/scores/non_members"):
        assert len(acc.Histograms(tag)) == 2
    assert len(acc.Tensors("privacy/pr_curve")) == 2
    text_tags = [t for t in tags["tensors"] if t.startswith("privacy/summary")]
    assert len(text_tags) == 1
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(text_tags[0])]
    assert len(texts) == 2 and "Log-MIA strict" in texts[-1] and "chance" in texts[-1]
    layout = acc.Tensors("custom_scalars__config__")
    assert len(layout) == 1 and b"privacy/log_mia_strict" in layout[0].tensor_proto.string_val[0]

    # the JSON-lines history sits next to the event file, one line per check
    assert [line["epoch"] for line in checks_in(log_dir / HISTORY_FILE)] == [0, 1]


def test_every_n_steps_logs_each_check_once_at_its_step(tmp_path):
    monitor = _monitor(every_n_steps=5)
    trainer, _ = _fit(tmp_path, monitor, max_epochs=1)  # 16 steps, log_every_n_steps=50
    assert [r.step for r in monitor.history] == [5, 10, 15]
    assert "privacy/log_mia_relaxed" in trainer.callback_metrics
    acc = _events(trainer.logger.log_dir)
    assert [e.step for e in acc.Scalars("privacy/log_mia_relaxed")] == [5, 10, 15]
    assert [e.step for e in acc.Histograms("privacy/scores/members")] == [5, 10, 15]


def test_without_tensorboard_logger_writes_into_log_dir(tmp_path):
    monitor = _monitor(log_dir=tmp_path / "privacy")
    _fit(tmp_path, monitor, max_epochs=1, logger=False)
    acc = _events(tmp_path / "privacy")
    assert [e.value for e in acc.Scalars("privacy/log_mia_strict")] == pytest.approx(
        [monitor.history[0].strict], abs=1e-6
    )
    assert len(checks_in(tmp_path / "privacy" / HISTORY_FILE)) == 1


def test_tensorboard_false_leaves_tensorboard_to_the_scalars(tmp_path):
    monitor = _monitor(tensorboard=False)
    trainer, _ = _fit(tmp_path, monitor, max_epochs=1)
    acc = _events(trainer.logger.log_dir)
    assert len(acc.Scalars("privacy/log_mia_strict")) == 1
    assert acc.Tags()["histograms"] == [] and acc.Tags()["tensors"] == []
    assert len(checks_in(Path(trainer.logger.log_dir) / HISTORY_FILE)) == 1


# ---------------------------------------------------------------------------- 3
def _first_breach(history) -> int:
    return next(r.epoch for r in history if r.breached)


def test_budget_stops_at_the_breach_and_alert_does_not(tmp_path):
    budget = dict(max_level="none")
    stopper = _monitor(budget=LeakageBudget(**budget, action="stop"), horizon=6)
    trainer, _ = _fit(tmp_path / "stop", stopper, max_epochs=6)
    breach = _first_breach(stopper.history)
    assert breach < 5  # it did stop early
    assert stopper.should_stop and trainer.should_stop
    assert stopper.stopped_epoch == breach == stopper.history[-1].epoch
    assert trainer.current_epoch == breach + 1  # the epoch of the breach was completed
    assert stopper.stop_reason is StopReason.LEVEL_EXCEEDED
    assert stopper.history[-1].action == "stop"

    # same seed, same training (the probe leaves it alone): alert logs the same breach and
    # training runs on
    alerter = _monitor(budget=LeakageBudget(**budget, action="alert"), horizon=6)
    trainer, _ = _fit(tmp_path / "alert", alerter, max_epochs=breach + 2)
    assert trainer.current_epoch == breach + 2 and not trainer.should_stop
    assert _first_breach(alerter.history) == breach
    assert alerter.history[breach].action == "alert"
    assert not alerter.should_stop and alerter.stopped_epoch is None
    assert alerter.stop_reason is StopReason.NOT_STOPPED

    raiser = _monitor(budget=LeakageBudget(**budget, action="raise"), horizon=6)
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exceeded") as info:
        _fit(tmp_path / "raise", raiser, max_epochs=6)
    assert info.value.report.epoch == breach


# ---------------------------------------------------------------------------- 4
def test_lightning_early_stopping_on_a_leakage_key(tmp_path):
    threshold = 0.4
    monitor = _monitor()
    stop = EarlyStopping(monitor="privacy/log_mia_strict", mode="max",
                         stopping_threshold=threshold, patience=100)
    trainer, _ = _fit(tmp_path, monitor, max_epochs=6, extra=[stop])
    crossed = next(r.epoch for r in monitor.history if r.strict > threshold)
    assert crossed < 5
    assert stop.stopped_epoch == crossed == monitor.history[-1].epoch
    assert trainer.current_epoch == crossed + 1
    assert not monitor.should_stop  # it was EarlyStopping, not the budget


# ---------------------------------------------------------------------------- 5
def test_resume_from_checkpoint_continues_the_run(tmp_path):
    # An unshuffled loader and no dropout: training from the checkpoint is exactly the
    # training an uninterrupted run does, so every number of every check must match.
    def checkpoints():
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="privacy/log_mia_strict",
                               mode="max", save_last=True)

    def fit(monitor, *, callbacks, folder, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        trainer = _trainer(tmp_path, max_epochs=4, callbacks=[monitor, *callbacks],
                           enable_checkpointing=bool(callbacks),
                           logger=TensorBoardLogger(tmp_path, name=folder))
        trainer.fit(DigitsModule(), _loader(shuffle=False), ckpt_path=ckpt_path)
        return trainer

    # interrupted after epoch 1 of a run planned for 4 epochs
    ckpt = checkpoints()
    first = _monitor()
    fit(first, callbacks=[ckpt, StopAfterEpoch(1)], folder="first")
    assert ckpt.best_model_score is not None  # ModelCheckpoint saw the leakage key
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["callbacks"][first.state_key]["checks"] == 2
    assert saved["callbacks"][first.state_key]["run_id"] == first.monitor.run_id

    second = _monitor()
    trainer = fit(second, callbacks=[checkpoints()], folder="second",
                  ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.monitor.run_id == first.monitor.run_id  # the same run, continued
    assert second.monitor.checks == 4
    assert [r.check for r in second.history] == [1, 2, 3, 4]
    assert [r.epoch for r in second.history] == [0, 1, 2, 3]
    assert [readings(r) for r in second.history[:2]] == [readings(r) for r in first.history]
    assert second.monitor.calibration.horizon == 4

    # the run uninterrupted: the same run-level test, so the same thresholds and readings
    whole = _monitor()
    fit(whole, callbacks=[], folder="whole")
    assert whole.monitor.run_id != first.monitor.run_id
    assert [r.p_threshold for r in second.history] == [r.p_threshold for r in whole.history]
    assert [readings(r) for r in second.history] == [readings(r) for r in whole.history]

    # the resumed run's history file opens with the run's header, then its new checks
    resumed = Path(trainer.log_dir) / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(resumed)] == [first.monitor.run_id]
    assert [line["check"] for line in checks_in(resumed)] == [3, 4]


def test_a_state_loaded_by_hand_continues_its_run(tmp_path):
    first = _monitor()
    _fit(tmp_path / "a", first, max_epochs=2)
    second = _monitor()
    second.load_state_dict(first.state_dict())
    _fit(tmp_path / "b", second, max_epochs=4)
    assert second.monitor.run_id == first.monitor.run_id
    assert second.monitor.calibration.horizon == first.monitor.calibration.horizon == 2
    assert [r.check for r in second.history] == [1, 2, 3, 4]
    assert [readings(r) for r in second.history[:2]] == [readings(r) for r in first.history]
    # the epochs the loaded state had checked are not checked again
    assert [r.epoch for r in second.history] == [0, 1, 2, 3]

    # the state is used once: the next fit is a new run
    _fit(tmp_path / "c", second, max_epochs=1)
    assert second.monitor.run_id != first.monitor.run_id
    assert [r.check for r in second.history] == [1]


def test_a_second_fit_restarts_the_history_under_a_new_run_id(tmp_path):
    monitor = _monitor()
    _fit(tmp_path, monitor, max_epochs=2, logger=False, default_root_dir=tmp_path)
    first_id = monitor.monitor.run_id
    assert monitor.monitor.calibration.horizon == 2
    _fit(tmp_path, monitor, max_epochs=1, logger=False, default_root_dir=tmp_path)
    second_id = monitor.monitor.run_id
    assert second_id != first_id
    assert [r.check for r in monitor.history] == [1]
    assert monitor.monitor.calibration.horizon == 1  # a fresh run-level test

    history = tmp_path / HISTORY_FILE  # both runs wrote into default_root_dir
    assert [h["run_id"] for h in headers_in(history)] == [first_id, second_id]
    assert [(line["run_id"], line["check"]) for line in checks_in(history)] == [
        (first_id, 1), (first_id, 2), (second_id, 1)
    ]


# ---------------------------------------------------------------------------- any logger
def test_history_lands_in_the_csv_loggers_folder_and_report_prints_it(tmp_path, capsys):
    monitor = _monitor()
    trainer, _ = _fit(tmp_path, monitor, max_epochs=2, logger=CSVLogger(tmp_path))
    folder = Path(trainer.logger.log_dir)
    assert folder == tmp_path / "lightning_logs" / "version_0"
    assert list(tmp_path.rglob(HISTORY_FILE)) == [folder / HISTORY_FILE]
    assert [line["epoch"] for line in checks_in(folder / HISTORY_FILE)] == [0, 1]
    assert "privacy/log_mia_strict" in (folder / "metrics.csv").read_text()

    capsys.readouterr()
    assert fesmia_hooks_cli(["report", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{folder}: 2 checks")
    assert len([line for line in out.splitlines() if line.lstrip().startswith(("1 ", "2 "))]) == 2


def test_without_a_logger_the_history_lands_in_default_root_dir(tmp_path, capsys):
    root = tmp_path / "root"
    monitor = _monitor()
    _fit(tmp_path, monitor, max_epochs=1, logger=False, default_root_dir=root)
    assert list(tmp_path.rglob(HISTORY_FILE)) == [root / HISTORY_FILE]
    assert [h["run_id"] for h in headers_in(root / HISTORY_FILE)] == [monitor.monitor.run_id]
    assert len(checks_in(root / HISTORY_FILE)) == 1

    capsys.readouterr()
    assert fesmia_hooks_cli(["report", str(root), "--no-plot"]) == 0
    assert capsys.readouterr().out.startswith(f"{root}: 1 check")


# ---------------------------------------------------------------------------- horizon
@pytest.mark.parametrize(
    ("cadence", "checks"),
    [({"every_n_epochs": 1}, 3), ({"every_n_steps": 5}, 8)],
    ids=["every_n_epochs", "every_n_steps"],
)
def test_horizon_comes_from_max_steps_when_it_ends_the_run_first(tmp_path, cadence, checks):
    # max_steps=40 ends the run in its third epoch (16 steps each), long before max_epochs
    monitor = _monitor(**cadence)
    trainer, _ = _fit(tmp_path, monitor, max_epochs=1000, max_steps=40)
    assert trainer.global_step == 40  # max_steps ended it, in its third epoch
    assert monitor.monitor.calibration.horizon == checks
    assert len(monitor.history) == checks


# ---------------------------------------------------------------------------- sinks
def test_user_sinks_receive_every_check(tmp_path):
    sink = RecordingSink()
    monitor = _monitor(sinks=[sink])
    _fit(tmp_path, monitor, max_epochs=3)
    steps = [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(3)]
    assert sink.logged == [(1, 0, steps[0]), (2, 1, steps[1]), (3, 2, steps[2])]
    assert sink.closed >= 1  # closed at the end of fit
    assert [r.check for r in monitor.history] == [1, 2, 3]


# ---------------------------------------------------------------------------- checkpoint names
def test_checkpoint_filename_with_a_privacy_key(tmp_path):
    # The recipe of the class docstring: no sub-folder from the "/", the value in the name.
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="privacy/log_mia_strict",
                           mode="max", auto_insert_metric_name=False,
                           filename="epoch{epoch}-strict{privacy/log_mia_strict:.2f}")
    monitor = _monitor()
    _fit(tmp_path, monitor, max_epochs=2, extra=[ckpt], enable_checkpointing=True)
    best = max(monitor.history, key=lambda r: r.strict)  # the first of equals, as ModelCheckpoint
    logged = float(torch.tensor(best.strict, dtype=torch.float32))  # as pl_module.log holds it
    name = f"epoch{best.epoch}-strict{logged:.2f}.ckpt"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [name]
    assert (tmp_path / "ckpt" / name).is_file()
    assert Path(ckpt.best_model_path) == tmp_path / "ckpt" / name


# ---------------------------------------------------------------------------- 6
def test_ddp_spawn_ranks_stop_together_and_only_rank_zero_writes(tmp_path):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    monitor = _monitor(budget=LeakageBudget(max_level="none"), horizon=5,
                       sinks=[RankFileSink(str(ranks))])
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[monitor, RankRecorder(str(ranks))],
        logger=TensorBoardLogger(tmp_path / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(DigitsModule(lr=1e-2), _loader())

    seen = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["stopped_epoch"] is not None and seen[0]["stopped_epoch"] < 4
    assert seen[0]["stopped_epoch"] == seen[1]["stopped_epoch"]
    assert seen[0]["current_epoch"] == seen[1]["current_epoch"] == seen[0]["stopped_epoch"] + 1
    assert seen[0]["should_stop"] and seen[1]["should_stop"]
    assert seen[0]["stop_reason"] == seen[1]["stop_reason"] == "level_exceeded"
    # rank zero: the history, TensorBoard and the user's sink; rank one holds the user's
    # sink (it came with the callback) but writes nothing to it
    assert (seen[0]["sinks"], seen[1]["sinks"]) == (3, 1)
    sink_files = sorted(p.name for p in ranks.glob("sink-rank*.txt"))
    assert sink_files == ["sink-rank0.txt"]
    checks = list(range(1, seen[0]["checks"] + 1))
    assert [int(n) for n in (ranks / "sink-rank0.txt").read_text().split()] == checks

    histories = list(tmp_path.rglob(HISTORY_FILE))
    assert len(histories) == 1
    epochs = [line["epoch"] for line in checks_in(histories[0])]
    assert epochs == list(range(seen[0]["checks"]))
    events = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert len(events) == 1
    acc = _events(events[0].parent)
    assert len(acc.Scalars("privacy/log_mia_strict")) == seen[0]["checks"]
    assert len(acc.Histograms("privacy/scores/members")) == seen[0]["checks"]


# ---------------------------------------------------------------------------- 7
def test_probe_leaves_training_untouched(tmp_path):
    monitor = _monitor()
    _, watched = _fit(tmp_path / "a", monitor, max_epochs=3,
                      model=_seeded(DigitsModule, hidden=64, noisy_layers=True))
    _, plain = _fit(tmp_path / "b", None, max_epochs=3,
                    model=_seeded(DigitsModule, hidden=64, noisy_layers=True))
    assert len(monitor.history) == 3
    assert watched.training and plain.training
    a, b = watched.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _seeded(cls, **kwargs):
    pl.seed_everything(1, verbose=False)
    return cls(**kwargs)


# ---------------------------------------------------------------------------- 8
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensorboard": "yes"}, r"`tensorboard` must be a bool, got 'yes'"),
        ({"restore_safe_weights": 1}, r"`restore_safe_weights` must be a bool, got 1"),
        ({"log_dir": 3}, r"`log_dir` must be a path \(str or os.PathLike\) or None, got int"),
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be a positive int, got 0"),
        ({"on_error": "ignore"}, r"`on_error` must be one of 'warn', 'raise', got 'ignore'"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        _monitor(**kwargs)


def test_canaries_must_be_a_canary_set():
    with pytest.raises(ConfigurationError, match="`canaries` must be a CanarySet, a SequenceCanarySet, a factory"):
        PrivacyMonitor(_task().train)


def test_state_dict_round_trip():
    monitor = _monitor()
    assert monitor.state_key == "PrivacyMonitor{'every_n_epochs': 1, 'every_n_steps': None}"
    state = monitor.state_dict()
    other = _monitor()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "fesmia_hooks.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'fesmia-hooks\[lightning\]'"):
        importlib.import_module("fesmia_hooks.integrations.lightning")


def test_core_import_leaves_lightning_out():
    code = (
        "import sys, fesmia_hooks; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_second_fit_is_a_new_run(tmp_path):
    stopper = _monitor(budget=LeakageBudget(max_level="none", action="stop"), horizon=6)
    _fit(tmp_path / "first", stopper, max_epochs=6)
    assert stopper.should_stop
    stopped_at = stopper.stopped_epoch
    trainer, _ = _fit(tmp_path / "second", stopper, max_epochs=6)
    # A fresh run: history and alpha spending start again, the old stop does not carry over.
    assert [r.check for r in stopper.history] == list(range(1, len(stopper.history) + 1))
    assert stopper.history[0].epoch == 0 and len(stopper.history) == stopped_at + 1
    assert stopper.stopped_epoch == stopped_at == trainer.current_epoch - 1


def test_an_asynchronous_callback_stops_one_epoch_later_on_the_same_readings(tmp_path):
    budget = LeakageBudget(max_level="none", action="stop")
    sync = _monitor(budget=budget, horizon=6)
    _fit(tmp_path / "sync", sync, max_epochs=6)
    breach = _first_breach(sync.history)
    lazy = _monitor(budget=LeakageBudget(max_level="none", action="stop"), horizon=6,
                    asynchronous=True)
    trainer, _ = _fit(tmp_path / "async", lazy, max_epochs=6)
    assert lazy.should_stop and lazy.stopped_epoch == breach  # the epoch whose model leaked
    assert trainer.current_epoch == breach + 2  # ... the decision landed one epoch later
    strip = [readings(r)
             for r in (sync.history, lazy.history)[0]]
    assert [readings(r) for r in lazy.history[: len(strip)]] == strip


def test_an_asynchronous_decision_lands_at_the_next_epoch_end_not_the_next_check(tmp_path):
    # every_n_epochs=2: checks at epochs 1, 3, 5; a stop read at epoch 1 lands at the end
    # of epoch 2 (training ends there), not at epoch 3's check.
    sync = _monitor(budget=LeakageBudget(max_level="none", action="stop"), horizon=4,
                    every_n_epochs=2)
    _fit(tmp_path / "sync", sync, max_epochs=8)
    breach = _first_breach(sync.history)
    lazy = _monitor(budget=LeakageBudget(max_level="none", action="stop"), horizon=4,
                    every_n_epochs=2, asynchronous=True)
    trainer, _ = _fit(tmp_path / "async", lazy, max_epochs=8)
    assert lazy.should_stop and lazy.stopped_epoch == breach
    assert trainer.current_epoch == breach + 2  # stopped at the end of epoch breach + 1
    assert [r.epoch for r in lazy.history] == [r.epoch for r in sync.history]


def test_a_failed_fit_records_the_asynchronous_check_it_left_running(tmp_path):
    class Crash(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("the machine went away")

    lazy = _monitor(budget=LeakageBudget(max_level="none", action="stop"), horizon=6,
                    asynchronous=True)
    with pytest.raises(RuntimeError, match="went away"):
        _fit(tmp_path, lazy, max_epochs=6, extra=[Crash()])
    # the check of epoch 1 started before the crash: it is recorded, nothing is pending
    assert lazy.monitor._pending is None and [r.epoch for r in lazy.history] == [0, 1]
    [history] = tmp_path.rglob("privacy_history.jsonl")
    assert history.read_text().count('"check"') == 2


def test_the_last_asynchronous_check_reaches_the_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    lazy = _monitor(horizon=3, asynchronous=True)
    trainer, _ = _fit(tmp_path, lazy, max_epochs=3, logger=CSVLogger(tmp_path))
    [metrics] = list(tmp_path.rglob("metrics.csv"))
    import csv

    rows = [r for r in csv.DictReader(open(metrics)) if r.get("privacy/p_value")]
    assert len(rows) == len(lazy.history) == 3  # the third landed at the end of training
