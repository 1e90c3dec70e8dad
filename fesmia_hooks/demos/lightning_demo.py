"""The digits demo in PyTorch Lightning, watched by the Lightning ``PrivacyMonitor`` callback.

The same setting as :func:`fesmia_hooks.demos.digits.run_torch_demo` (same data, model,
optimizer, probe and budget), trained by a Lightning ``Trainer`` on the CPU. Needs
scikit-learn and Lightning: ``pip install 'fesmia-hooks[examples,lightning]'``. Lightning is
imported only when the demo runs.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fesmia_hooks.budget import LeakageBudget
from fesmia_hooks.demos.digits import closing_lines, digits_mlp, format_row, load_noisy_digits
from fesmia_hooks.monitor import PrivacyMonitor
from fesmia_hooks.probe import FeSMIA
from fesmia_hooks.sinks import HISTORY_FILE

__all__ = ["run_lightning_demo"]


def run_lightning_demo(
    *,
    log_dir: str | Path = "runs/fesmia-demo-lightning",
    epochs: int = 100,
    seed: int = 0,
    out: Callable[[str], None] = print,
) -> PrivacyMonitor:
    """Train the digits MLP with a Lightning ``Trainer``, checking leakage after every epoch.

    Stops when the default :class:`LeakageBudget` is breached. TensorBoard events and the
    history go into a new ``version_<n>`` folder of ``log_dir`` (Lightning's
    ``TensorBoardLogger``).

    Args:
        log_dir: Root folder of the TensorBoard logger.
        epochs: Most epochs to train (the horizon of the run-level test follows from it).
        seed: Seed of data, model, shuffling and probe.
        out: Where the printed lines go.

    Returns:
        The core :class:`~fesmia_hooks.PrivacyMonitor` (its history, stop state and sinks).
    """
    from fesmia_hooks.integrations.lightning import PrivacyMonitor as LightningMonitor
    from fesmia_hooks.integrations.lightning import pl

    torch.manual_seed(seed)
    task = load_noisy_digits(seed=seed)
    x, y = task.train

    class DigitsModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = digits_mlp()

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            loss = nn.functional.cross_entropy(self(inputs), targets)
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class PrintRows(pl.Callback):
        """Print one row per check, after the monitor (it comes first in the callbacks)."""

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            report = callback.monitor.last_report
            if report is not None and report.epoch == trainer.current_epoch:
                loss = trainer.callback_metrics.get("train_loss")
                out(format_row(report, None if loss is None else float(loss)))

    model = DigitsModule()
    callback = LightningMonitor(
        task.canaries, probe=FeSMIA(seed=seed), budget=LeakageBudget()
    )
    monitor = callback.monitor
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    logger = pl.loggers.TensorBoardLogger(str(log_dir), name="")
    out(f"fesmia-hooks demo (Lightning): digits MLP, {len(x)} training samples with 20% label "
        f"noise, {task.canaries}")
    out(f"probe {monitor.probe!r}; budget {monitor.budget!r}")
    start = time.perf_counter()
    lightning_log = logging.getLogger(pl.__name__)
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # keep the demo's output to its own rows
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # Lightning 2.6 under torch >= 2.10 warns about torch's own pytree internals.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            trainer = pl.Trainer(
                max_epochs=epochs,
                accelerator="cpu",
                devices=1,
                logger=logger,
                callbacks=[callback, PrintRows()],
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                log_every_n_steps=10,
            )
            trainer.fit(model, loader)
    finally:
        lightning_log.setLevel(level)
    closing_lines(monitor, epochs=epochs, log_dir=log_dir, start=start, out=out,
                  stop_state=callback, history=Path(logger.log_dir) / HISTORY_FILE)
    return monitor
