"""PyTorch Lightning: a character-level language model leaks, and the callback stops it.

Same data, model and probe as examples/text_lm_torch.py (passages of CPython's bundled
reference manual, pydoc_data.topics), trained by a Lightning Trainer. The callback logs the
privacy/* scalars through the TensorBoardLogger, next to the training loss.

Run: python examples/text_lm_lightning.py   (then: tensorboard --logdir runs/example-text-lightning)
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

import fesmia_hooks as fh
from fesmia_hooks.demos.text_demo import CharGRU, lm_loss, make_text_task
from fesmia_hooks.integrations.lightning import PrivacyMonitor
from fesmia_hooks.text import SequenceSignals


class CharLM(pl.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.net = CharGRU(vocab_size)

    def forward(self, ids):  # the probe calls this: token ids [B, T] -> logits [B, T, V]
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        ids, targets = batch
        loss = lm_loss(self.net, ids, targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def on_before_optimizer_step(self, optimizer):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)


def main(epochs=60, log_dir="runs/example-text-lightning"):
    torch.set_num_threads(1)  # a small model: on a shared CPU, more threads only wait
    pl.seed_everything(0)
    task = make_text_task(members=256, held_out=256, canaries=64)
    loader = DataLoader(TensorDataset(*task.train), batch_size=32, shuffle=True)
    privacy = PrivacyMonitor(
        task.canaries,
        probe=fh.FeSMIA(signal_fn=SequenceSignals(("log_prob", "min_k", "zlib"))),
        budget=fh.LeakageBudget(max_level="low", action="stop"),
    )
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[privacy], logger=TensorBoardLogger(log_dir),
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(CharLM(task.vocab_size), loader)
    for report in privacy.history:
        print(report.summary())
    print("stopped at epoch", privacy.stopped_epoch, "reason:", privacy.stop_reason.value)
    return privacy


if __name__ == "__main__":
    main()
