"""The digits demo: a plain PyTorch loop that memorises noisy labels, watched by the monitor.

Needs scikit-learn (``pip install fesmia-hooks[examples]``) for its bundled digits data set
(1,797 real 8x8 images; nothing is downloaded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fesmia_hooks.budget import LeakageBudget
from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.monitor import PrivacyMonitor
from fesmia_hooks.probe import FeSMIA
from fesmia_hooks.report import LeakageReport
from fesmia_hooks.sinks import HISTORY_FILE

__all__ = [
    "DigitsTask",
    "closing_lines",
    "digits_arrays",
    "digits_mlp",
    "format_row",
    "load_noisy_digits",
    "run_torch_demo",
]


@dataclass
class DigitsTask:
    """Training data and canaries of the demo.

    Attributes:
        train: ``(inputs, labels)`` trained on; holds the canary members.
        canaries: 64 members (inside ``train``) and 64 non-members (never trained on).
        num_classes: 10.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    canaries: CanarySet
    num_classes: int = 10


def digits_arrays(who: str = "this") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits: ``[n, 64]`` pixels scaled to [0, 1] and their labels.

    Raises:
        ImportError: Without scikit-learn, naming ``who`` and the extra to install.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{who} needs scikit-learn: pip install 'fesmia-hooks[examples]'"
        ) from exc
    data = load_digits()
    return (torch.tensor(data.data / 16.0, dtype=torch.float32),
            torch.tensor(data.target, dtype=torch.long))


def load_noisy_digits(
    *, members: int = 300, canaries: int = 64, label_noise: float = 0.2, seed: int = 0
) -> DigitsTask:
    """scikit-learn's digits with a share of labels replaced at random, split for the demo.

    ``members + canaries`` samples are drawn; :meth:`CanarySet.split` carves ``canaries``
    members and ``canaries`` non-members out of them, so ``members`` samples are trained on.
    Noisy labels can only be learned by memorising them, which makes the model leak.
    """
    x, y = digits_arrays("the digits demo")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)[: members + canaries]
    x, y = x[order], y[order]
    flip = torch.rand(len(y), generator=g) < label_noise
    y = torch.where(flip, torch.randint(0, 10, (len(y),), generator=g), y)
    train, canary_set = CanarySet.split((x, y), size=canaries, seed=seed, num_classes=10)
    return DigitsTask(train=train, canaries=canary_set)


def digits_mlp(hidden: int = 1024) -> nn.Module:
    """The reference victim: an MLP 64-hidden-10."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def format_row(report: LeakageReport, loss: float | None = None) -> str:
    """One printed line per check: the numbers, their intervals and chance levels."""
    lost = "" if loss is None else f"loss {loss:6.3f}  "
    return (
        f"epoch {report.epoch if report.epoch is not None else '-':>3}  {lost}"
        f"strict {report.strict:.2f} [{report.strict_low:.2f},{report.strict_high:.2f}] "
        f"(chance {report.chance_strict:.2f})  named {report.members_named:4.1f} of "
        f"{report.queries} (chance {report.chance_members_named:.2f}, share "
        f"{report.share_beyond_chance:+.2f})  AUC {report.auc:.2f}  "
        f"p {report.p_value:.4f}/{report.p_threshold:.4f}  {report.level.value:<8}"
        f"{'  -> ' + report.action.upper() if report.breached else ''}"
    )


def closing_lines(
    monitor: PrivacyMonitor,
    *,
    epochs: int,
    log_dir: str | Path,
    start: float,
    out: Callable[[str], None],
    stop_state: Any = None,
    history: Path | None = None,
) -> None:
    """Print how a demo run ended and where its outputs are; close the monitor's sinks.

    Args:
        monitor: The core monitor of the run.
        epochs: Most epochs the run could train.
        log_dir: Where TensorBoard should look.
        start: ``time.perf_counter()`` at the start of training.
        out: Where the lines go.
        stop_state: What holds the stop state, when not ``monitor`` (a framework callback).
        history: The history file, when not ``log_dir / privacy_history.jsonl``.
    """
    state = monitor if stop_state is None else stop_state
    if state.should_stop:
        out(f"stopped at epoch {state.stopped_epoch}: {state.stop_reason.value}")
    else:
        out(f"finished {epochs} epochs within budget")
    monitor.close()
    history = Path(log_dir) / HISTORY_FILE if history is None else history
    out(f"{monitor.checks} checks in {time.perf_counter() - start:.1f} s; "
        f"TensorBoard: tensorboard --logdir {log_dir}; history: {history}")


def run_torch_demo(
    *,
    log_dir: str | Path = "runs/fesmia-demo",
    epochs: int = 100,
    seed: int = 0,
    out: Callable[[str], None] = print,
) -> PrivacyMonitor:
    """Train the digits MLP in a plain loop, checking leakage after every epoch.

    Stops when the default :class:`LeakageBudget` is breached. Returns the monitor.
    """
    torch.manual_seed(seed)
    task = load_noisy_digits(seed=seed)
    x, y = task.train
    model = digits_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = PrivacyMonitor(
        task.canaries,
        probe=FeSMIA(seed=seed),
        budget=LeakageBudget(),
        horizon=epochs,
        log_dir=log_dir,
    )
    out(f"fesmia-hooks demo: digits MLP, {len(x)} training samples with 20% label noise, "
        f"{task.canaries}")
    out(f"probe {monitor.probe!r}; budget {monitor.budget!r}")
    monitor.preflight(model)  # before training: the split must not be told apart yet
    start = time.perf_counter()
    loss_value = float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
        report = monitor.step(model, epoch=epoch)
        if report is not None:
            out(format_row(report, loss_value))
        if monitor.should_stop:
            break
    closing_lines(monitor, epochs=epochs, log_dir=log_dir, start=start, out=out)
    return monitor
