"""Plain PyTorch: a character-level language model memorises English prose, and leaks.

The text is the Python reference manual's topics that ship with CPython (pydoc_data.topics);
256 passages are trained on, the rest never are. 64 of each are the canaries. The GRU
learns its passages by heart; the probe reads the canaries' mean log-likelihood, Min-K%
probability and zlib ratio, and the budget stops training when the leakage is more than low.

Run: python examples/text_lm_torch.py   (then: tensorboard --logdir runs/example-text-torch)
"""

import torch

import fesmia_hooks as fh
from fesmia_hooks.demos.text_demo import CharGRU, make_text_task, train_epoch
from fesmia_hooks.text import SequenceSignals

EPOCHS = 60
torch.set_num_threads(1)  # a small model: on a shared CPU, more threads only wait on each other
torch.manual_seed(0)
task = make_text_task(members=256, held_out=256, canaries=64)
# task.canaries was built with
#   fh.CanarySet.from_sequences(member_passages, non_member_passages, pad_token_id=0,
#                               vocab_size=len(vocab), decode=ids_to_text)
print(task.canaries)

model = CharGRU(task.vocab_size)  # forward(ids [B, T]) -> logits [B, T, V]
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
monitor = fh.PrivacyMonitor(
    task.canaries,
    probe=fh.FeSMIA(signal_fn=SequenceSignals(("log_prob", "min_k", "zlib"))),
    budget=fh.LeakageBudget(max_level="low", action="stop"),
    horizon=EPOCHS,
    log_dir="runs/example-text-torch",
)
monitor.preflight(model)  # before training: members and non-members must look alike

for epoch in range(EPOCHS):
    loss = train_epoch(model, optimizer, task.train)  # next-character cross-entropy
    report = monitor.step(model, epoch=epoch)  # None when no check is due
    if report is not None:
        print(f"epoch {epoch:2d}  loss {loss:.3f}  {report.summary()}")
    if monitor.should_stop:
        print("stopped:", monitor.stop_message)
        break
monitor.close()
