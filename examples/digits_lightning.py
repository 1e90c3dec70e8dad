"""PyTorch Lightning: one callback watches leakage, logs it, and stops at the budget.

Run: python examples/digits_lightning.py   (then: tensorboard --logdir runs/example-lightning)
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fesmia_hooks as fh
from fesmia_hooks.demos.digits import load_noisy_digits
from fesmia_hooks.integrations.lightning import PrivacyMonitor


class Digits(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(epochs=60, log_dir="runs/example-lightning"):
    pl.seed_everything(0)
    task = load_noisy_digits()
    loader = DataLoader(TensorDataset(*task.train), batch_size=32, shuffle=True)
    privacy = PrivacyMonitor(
        task.canaries,
        probe=fh.FeSMIA(method="simpleshot", shots=5, queries=15),
        budget=fh.LeakageBudget(max_level="low", action="stop"),
    )
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[privacy], logger=TensorBoardLogger(log_dir),
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Digits(), loader)
    for report in privacy.history:
        print(report.summary())
    print("stopped at epoch", privacy.stopped_epoch, "reason:", privacy.stop_reason.value)
    return privacy


if __name__ == "__main__":
    main()
