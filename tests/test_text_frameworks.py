"""Token-sequence canaries through the Lightning and Keras adapters: a memorising LM is stopped."""

import os

import pytest
import torch
from _history import checks_in  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.sinks import HISTORY_FILE
from fesmia_hooks.text import SequenceSignals

V = 12


def tokens():
    data = torch.randint(0, V, (96, 20), generator=torch.Generator().manual_seed(0))
    canaries = fh.CanarySet.from_sequences(data[:32], data[64:], vocab_size=V)
    return data[:64], canaries


def probe():
    return fh.FeSMIA(signal_fn=SequenceSignals(), episodes=20, permutations=99)


def test_lightning_stops_a_memorising_lm_and_logs_through_its_logger(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from fesmia_hooks.integrations.lightning import PrivacyMonitor

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(V, 16), nn.GRU(16, 64, batch_first=True)
            self.head = nn.Linear(64, V)

        def forward(self, ids):
            return self.head(self.rnn(self.embed(ids))[0])

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            logits = self(ids[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    train, canaries = tokens()
    callback = PrivacyMonitor(canaries, probe=probe(), budget=fh.LeakageBudget())
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=15, accelerator="cpu", callbacks=[callback],
                         logger=pl.loggers.TensorBoardLogger(str(tmp_path), name=""),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(LM(), DataLoader(TensorDataset(train), batch_size=16, shuffle=True))
    stopped = callback.stopped_epoch
    assert callback.should_stop and stopped is not None and trainer.current_epoch == stopped + 1
    assert trainer.callback_metrics["privacy/level_index"] >= 2  # moderate or above
    folder = tmp_path / "version_0"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    values = [e.value for e in events.Scalars("privacy/log_mia_strict")]
    assert values == pytest.approx([r.strict for r in callback.history])
    assert len(checks_in(folder / HISTORY_FILE)) == stopped + 1


def test_keras_stops_a_memorising_lm(tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":  # pragma: no cover - depends on the environment
        pytest.skip("the Keras adapter runs on KERAS_BACKEND=torch")
    from fesmia_hooks.integrations.keras import PrivacyMonitor

    train, canaries = tokens()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(V, 16),
        keras.layers.GRU(64, return_sequences=True),
        keras.layers.Dense(V),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = PrivacyMonitor(canaries, probe=probe(), budget=fh.LeakageBudget(),
                              log_dir=tmp_path)
    history = model.fit(train[:, :-1].numpy(), train[:, 1:].numpy(), batch_size=16, epochs=15,
                        callbacks=[callback], verbose=0)
    core = callback.monitor
    assert core.should_stop and len(history.history["loss"]) == core.stopped_epoch + 1
    assert history.history["privacy/log_mia_strict"] == pytest.approx(
        [r.strict for r in core.history])
