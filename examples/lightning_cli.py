"""LightningCLI: the privacy callback configured from a YAML file, no Python changes.

Run: python examples/lightning_cli.py fit --config examples/lightning_cli.yaml
     (then: fesmia-hooks report runs/example-lightning-cli)

The callback is listed under ``trainer.callbacks`` in ``lightning_cli.yaml``, with the
probe, the budget and the cadence as its ``init_args``. It gives no ``canaries``: the
datamodule below holds them (its ``canaries`` attribute), and the callback reads them when
``fit`` starts. A configuration can instead name a factory,
``canaries: "my_project.data:make_canaries"``.
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fesmia_hooks.demos.digits import load_noisy_digits


class Digits(pl.LightningModule):
    def __init__(self, hidden: int = 1024, lr: float = 1e-3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class NoisyDigits(pl.LightningDataModule):
    """The training set, and the canary set held out of it (``canaries``)."""

    def __init__(self, batch_size: int = 32, label_noise: float = 0.2, seed: int = 0):
        super().__init__()
        task = load_noisy_digits(label_noise=label_noise, seed=seed)
        self.train_set = TensorDataset(*task.train)
        self.canaries = task.canaries  # what PrivacyMonitor reads when given none
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


def main(args=None):
    return LightningCLI(Digits, NoisyDigits, args=args)


if __name__ == "__main__":
    main()
