"""Opacus DP-SGD on the digits, watched: the accountant's ε beside the canaries' ε lower bound.

A digits MLP is trained with DP-SGD (Opacus: per-sample gradients clipped to norm 1, Gaussian
noise, Poisson-sampled batches) at a target ε. 256 held-out digits with wrong labels are the
canaries; each is put into training by its own fair coin (``CanarySet.for_audit``). After
every epoch the monitor reads the accountant's ε (an upper bound), the one-run audit's ε
lower bound from the canaries (95% confidence) and FeS-MIA's Log-MIA reading.

Run: python examples/dp_opacus.py --epsilon 8           (plain PyTorch loop)
     python examples/dp_opacus.py --epsilon 1 --framework lightning
     python examples/dp_opacus.py --no-dp               (the same training without DP)
     python examples/dp_opacus.py --epsilon 8 --no-monitor
(then: tensorboard --logdir runs/example-dp)
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fesmia_hooks as fh
from fesmia_hooks.demos import one_torch_thread
from fesmia_hooks.demos.digits import digits_mlp
from fesmia_hooks.demos.dp_demo import (  # the split, the settings and the printed line
    BATCH_SIZE,
    DELTA,
    LEARNING_RATE,
    MAX_GRAD_NORM,
    MOMENTUM,
    format_check,
    load_audit_digits,
)
from fesmia_hooks.epsilon import best_attainable_epsilon

EPOCHS = 10
FRAMEWORKS = ("torch", "lightning")


class Run(NamedTuple):
    """What :func:`train` returns.

    Attributes:
        weights: The MLP's final ``state_dict`` (its own keys, without Opacus's wrapper).
        monitor: The core monitor, or ``None`` with ``monitor=False``.
        engine: Opacus's ``PrivacyEngine``, or ``None`` for non-private training.
        loader: The data loader training drew its batches from (Opacus's ``DPDataLoader``
            with Poisson sampling in a private run).
        epochs: Epochs trained (fewer than asked when a budget stopped the run).
        steps_per_epoch: Optimizer steps in one epoch.
        accuracy: Accuracy on the test digits.
        seconds: Wall-clock time of training, checks included.
    """

    weights: dict[str, torch.Tensor]
    monitor: fh.PrivacyMonitor | None
    engine: Any
    loader: DataLoader
    epochs: int
    steps_per_epoch: int
    accuracy: float
    seconds: float


def train(
    framework: str = "torch",
    epsilon: float = 8.0,
    *,
    monitor: bool = True,
    epochs: int = EPOCHS,
    seed: int = 0,
    log_dir: str = "runs/example-dp",
    budget: fh.LeakageBudget | None = None,
    probe: fh.FeSMIA | None = None,
    accountant: str = "rdp",
    out: Callable[[str], None] | None = None,
) -> Run:
    """Train the digits MLP with DP-SGD at ``epsilon`` (``0``: without DP), watched or not.

    The private run is Opacus's ``make_private_with_epsilon``: a ``GradSampleModule``, a
    ``DPOptimizer`` (SGD with momentum) and a ``DPDataLoader`` with Poisson sampling, whose
    noise multiplier spends ``epsilon`` (just under, for δ = 1e-5) in ``epochs`` epochs. The
    monitor checks after every epoch and reads the privacy engine as its ``accountant``.
    Runs on one CPU thread (restored on return): on a shared two-core machine this small
    model trains several times faster so.

    Args:
        framework: ``"torch"``, a plain loop watched through
            :func:`fesmia_hooks.integrations.torch.attach`, or ``"lightning"``, a Lightning
            ``Trainer`` with :class:`fesmia_hooks.integrations.lightning.PrivacyMonitor`.
        epsilon: Target ε of the whole run; ``0`` trains the same model without DP.
        monitor: Watch the run (``False``: the same training, unwatched).
        epochs: Epochs to train; Opacus sizes the noise for this many.
        seed: Seed of the split, the canaries' coins, the model, the batches, the noise
            and the probe.
        log_dir: Folder of the TensorBoard events and the history.
        budget: The monitor's budget (e.g. ``LeakageBudget(None, max_values={
            "epsilon_accountant": 4.0})``); ``None``: only watch.
        probe: The probe (default: ``FeSMIA(seed=seed)``).
        accountant: Opacus's accountant: ``"rdp"`` (default), ``"prv"`` or ``"gdp"``.
        out: Where the per-check lines go (``None``: nowhere).

    Returns:
        The :class:`Run`.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    if not epsilon >= 0 or epochs < 1:
        raise ValueError(f"need epsilon >= 0 and epochs >= 1, got {epsilon} and {epochs}")
    with one_torch_thread():  # a small model: on a shared CPU, more threads only wait
        return _train(framework, epsilon, monitor=monitor, epochs=epochs, seed=seed,
                      log_dir=log_dir, budget=budget, probe=probe, accountant=accountant,
                      out=out or (lambda line: None))


def _train(
    framework: str, epsilon: float, *, monitor: bool, epochs: int, seed: int, log_dir: str,
    budget: fh.LeakageBudget | None, probe: fh.FeSMIA | None, accountant: str,
    out: Callable[[str], None],
) -> Run:
    torch.manual_seed(seed)
    data = load_audit_digits(seed=seed)
    net = digits_mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    loader = DataLoader(TensorDataset(*data.train), batch_size=BATCH_SIZE, shuffle=True)
    model: nn.Module = net
    engine = None
    if epsilon > 0:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")  # an example
            # the noise search tries multipliers whose RDP optimum lies past Opacus's orders
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            engine = PrivacyEngine(accountant=accountant)
            model, optimizer, loader = engine.make_private_with_epsilon(
                module=net, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
                target_delta=DELTA, epochs=epochs, max_grad_norm=MAX_GRAD_NORM,
            )
    options: dict[str, Any] = {
        "probe": probe if probe is not None else fh.FeSMIA(seed=seed),
        "accountant": engine, "delta": DELTA, "budget": budget,
    }
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Opacus's backward hooks on a first layer whose input needs no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        fit = _fit_torch if framework == "torch" else _fit_lightning
        watcher, used, trained = fit(model, optimizer, loader, data.canaries if monitor else None,
                                     options, epochs=epochs, log_dir=log_dir, out=out)
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        x_test, y_test = data.test
        accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return Run(weights, watcher, engine, used, trained, len(loader), accuracy, seconds)


def _fit_torch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
    canaries: fh.CanarySet | None, options: dict[str, Any], *, epochs: int, log_dir: str,
    out: Callable[[str], None],
) -> tuple[fh.PrivacyMonitor | None, DataLoader, int]:
    """A plain loop; the monitor is attached to the optimizer and checks once per epoch."""
    from fesmia_hooks.integrations.torch import PrivacyMonitor, attach

    steps = len(loader)  # a Poisson loader draws len(loader) batches per epoch, as this one
    watch = None
    if canaries is not None:
        core = PrivacyMonitor(canaries, log_dir=log_dir, **options)
        watch = attach(model, optimizer, core, every_n_steps=steps, total_steps=epochs * steps)
    trained = 0
    try:
        for epoch in range(epochs):
            model.train()
            for inputs, targets in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(inputs), targets).backward()
                optimizer.step()  # the attached monitor checks after the epoch's last step
            trained = epoch + 1
            if watch is None:
                continue
            report = watch.monitor.last_report
            if report is not None and report.step == trained * steps:
                out(format_check(report, epoch))
            if watch.should_stop:
                break
    finally:
        if watch is not None:
            watch.remove()
            watch.monitor.close()
    return (None if watch is None else watch.monitor), loader, trained


def _fit_lightning(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
    canaries: fh.CanarySet | None, options: dict[str, Any], *, epochs: int, log_dir: str,
    out: Callable[[str], None],
) -> tuple[fh.PrivacyMonitor | None, DataLoader, int]:
    """A Lightning ``Trainer`` on Opacus's model, optimizer and Poisson loader, as they are.

    ``make_private`` ran before the trainer: the module trains the ``GradSampleModule``,
    ``configure_optimizers`` hands Lightning the ``DPOptimizer`` and ``fit`` gets the
    ``DPDataLoader``. On one device with ``use_distributed_sampler=False`` Lightning
    iterates that loader itself (its Poisson batch sampler is not replaced).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from fesmia_hooks.integrations.lightning import PrivacyMonitor

    class Digits(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return nn.functional.cross_entropy(self(inputs), targets)

        def configure_optimizers(self):
            return optimizer

    class PrintChecks(pl.Callback):
        """Print each check; it runs after the monitor (which comes first in the list)."""

        def on_train_epoch_end(self, trainer, pl_module):
            report = callback.monitor.last_report
            if report is not None and report.epoch == trainer.current_epoch:
                out(format_check(report, report.epoch))

    callbacks: list[Any] = []
    callback = None
    if canaries is not None:
        callback = PrivacyMonitor(canaries, **options)
        callbacks = [callback, PrintChecks()]
    lightning_log = logging.getLogger(pl.__name__)
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            trainer = pl.Trainer(
                max_epochs=epochs, accelerator="cpu", devices=1,
                logger=TensorBoardLogger(log_dir, name="", version=""),
                callbacks=callbacks, use_distributed_sampler=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0,
                log_every_n_steps=len(loader),
            )
            trainer.fit(Digits(), loader)
    finally:
        lightning_log.setLevel(level)
    return (None if callback is None else callback.monitor), trainer.train_dataloader, (
        trainer.current_epoch
    )


def summary(run: Run, epsilon: float) -> str:
    """The closing lines of one run."""
    setting = "non-private SGD" if run.engine is None else (
        f"DP-SGD at target ε {epsilon:g} (δ {DELTA:g}; noise multiplier "
        f"{run.engine.accountant.history[0][0]:.2f}, sampling rate "
        f"{run.engine.accountant.history[0][1]:.3f})"
    )
    lines = [f"{setting}: {run.epochs} epochs of {run.steps_per_epoch} steps, test accuracy "
             f"{run.accuracy:.3f}, {run.seconds:.1f} s"]
    if run.engine is not None:
        lines.append(f"accountant: ε = {run.engine.get_epsilon(DELTA):.2f} after "
                     f"{run.epochs * run.steps_per_epoch} steps")
    if run.monitor is not None and run.monitor.history:
        last = run.monitor.history[-1]
        best = best_attainable_epsilon(len(run.monitor.canaries))
        lines.append(
            f"audit: ε >= {last.epsilon_lower_bound:.2f} at {last.epsilon_confidence:.0%} "
            f"confidence ({len(run.monitor.canaries)} canaries can prove at most "
            f"{best:.2f}); Log-MIA strict {last.strict:.2f} (chance {last.chance_strict:.2f}), "
            f"AUC {last.auc:.2f}, level {last.level.value}"
        )
        if run.monitor.should_stop:
            lines.append(f"stopped by the budget after check {last.check} "
                         f"({run.monitor.stop_reason.value})")
    return "\n".join(lines)


def main(
    epochs: int = EPOCHS,
    log_dir: str = "runs/example-dp",
    *,
    framework: str = "torch",
    epsilon: float = 8.0,
    monitor: bool = True,
    max_epsilon: float | None = None,
    seed: int = 0,
):
    """Train, print a line per check and a summary; returns the monitor (or ``None``)."""
    budget = None if max_epsilon is None else fh.LeakageBudget(
        None, max_values={"epsilon_accountant": max_epsilon}, action="stop")
    print(f"digits MLP, {framework}, "
          + ("non-private" if epsilon == 0 else f"DP-SGD at target ε {epsilon:g}")
          + ("" if monitor else ", unwatched"))
    run = train(framework, epsilon, monitor=monitor, epochs=epochs, seed=seed,
                log_dir=log_dir, budget=budget, out=print)
    print(summary(run, epsilon))
    if monitor:
        print(f"TensorBoard: tensorboard --logdir {log_dir}")
    return run.monitor


def _cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    parser.add_argument("--epsilon", type=float, default=8.0,
                        help="target ε of the run (default 8); 0 trains without DP")
    parser.add_argument("--no-dp", action="store_true", help="the same as --epsilon 0")
    parser.add_argument("--no-monitor", action="store_true", help="train unwatched")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--max-epsilon", type=float, default=None,
                        help="stop when the accountant's ε passes this")
    parser.add_argument("--log-dir", default=None,
                        help="default: runs/example-dp/FRAMEWORK-epsEPSILON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epsilon = 0.0 if args.no_dp else args.epsilon
    log_dir = args.log_dir or f"runs/example-dp/{args.framework}-eps{epsilon:g}"
    main(args.epochs, log_dir, framework=args.framework, epsilon=epsilon,
         monitor=not args.no_monitor, max_epsilon=args.max_epsilon, seed=args.seed)


if __name__ == "__main__":
    _cli()
