"""The differential-privacy demo: DP-SGD at a few target ε, audited by its canaries.

The digits MLP (:func:`~fesmia_hooks.demos.digits.digits_mlp`) is trained with Opacus's
DP-SGD (per-sample gradients clipped to norm 1, Gaussian noise, Poisson-sampled batches) at
each target ε, and once without DP. 256 held-out digits with wrong labels are the canaries;
each is put into training by its own fair coin (:meth:`~fesmia_hooks.CanarySet.for_audit`),
so every check reports the one-run audit's ε lower bound beside the accountant's ε (an upper
bound) and FeS-MIA's Log-MIA reading. A lower bound above the accountant's ε would mean the
DP training or its accounting is broken; the non-private run shows what the same canaries
prove when nothing limits memorisation.

Needs Opacus and scikit-learn (its bundled digits; nothing is downloaded):
``pip install 'fesmia-hooks[dp,examples]'``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fesmia_hooks.budget import LeakageBudget
from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.demos import one_torch_thread
from fesmia_hooks.demos.digits import digits_arrays, digits_mlp
from fesmia_hooks.epsilon import best_attainable_epsilon
from fesmia_hooks.monitor import PrivacyMonitor
from fesmia_hooks.probe import FeSMIA
from fesmia_hooks.report import LeakageReport

__all__ = [
    "AuditDigits",
    "DPRun",
    "format_check",
    "import_opacus",
    "load_audit_digits",
    "run_dp_demo",
    "train_dp_digits",
]

#: Target ε of the demo's runs; 0 is the same training without DP.
TARGETS: tuple[float, ...] = (1.0, 8.0, 0.0)
#: δ of the accountant's ε and of the audit's bound.
DELTA = 1e-5
#: Expected batch size: Poisson sampling at rate ``BATCH_SIZE / training samples``.
BATCH_SIZE = 64
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 0.05
MOMENTUM = 0.9
#: Epochs of each run unless told otherwise.
EPOCHS = 15

_INSTALL = "pip install 'fesmia-hooks[dp]'"


def import_opacus() -> Any:
    """``opacus`` if it is installed; an ``ImportError`` naming the extra otherwise."""
    try:
        import opacus
    except ImportError as exc:
        raise ImportError(f"the DP demo needs opacus: {_INSTALL}") from exc
    return opacus


@dataclass
class AuditDigits:
    """The digits split for a privacy audit.

    Attributes:
        train: ``(inputs, labels)`` trained on: the training digits followed by the canaries
            whose coin came up heads (with their wrong labels).
        test: ``(inputs, labels)`` never trained on, for the accuracy.
        canaries: The randomised canaries (``random_inclusion=True``).
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    canaries: CanarySet


def load_audit_digits(*, canaries: int = 256, test: int = 300, seed: int = 0) -> AuditDigits:
    """scikit-learn's 1,797 digits cut into a test split, a canary pool and training digits.

    The digits are shuffled by ``seed``; the first ``test`` are the test split, the next
    ``canaries`` the pool that :meth:`CanarySet.for_audit` draws its coins on (each gets a
    wrong label), the rest are trained on together with the heads.
    """
    x, y = digits_arrays("the DP demo")
    if test + canaries >= len(y):
        raise ValueError(
            f"test + canaries must leave digits to train on (of {len(y)}), got "
            f"test={test} and canaries={canaries}"
        )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    pool = slice(test, test + canaries)
    (x_in, y_in), canary_set = CanarySet.for_audit(
        (x[pool], y[pool]), num_classes=10, size=canaries, seed=seed
    )
    rest = slice(test + canaries, None)
    return AuditDigits(
        train=(torch.cat([x[rest], x_in]), torch.cat([y[rest], y_in])),
        test=(x[:test], y[:test]),
        canaries=canary_set,
    )


def format_check(report: LeakageReport, epoch: int) -> str:
    """One printed line per check: both ε readings and the Log-MIA reading."""
    accountant = ("     -" if math.isnan(report.epsilon_accountant)
                  else f"{report.epsilon_accountant:6.2f}")
    return (
        f"epoch {epoch:3d}  ε accountant {accountant}  ε lower bound "
        f"{report.epsilon_lower_bound:5.2f}  Log-MIA strict {report.strict:.2f} "
        f"(chance {report.chance_strict:.2f})  AUC {report.auc:.2f}  p {report.p_value:.3f}  "
        f"{report.level.value}{'  -> ' + report.action.upper() if report.breached else ''}"
    )


@dataclass
class DPRun:
    """One run of :func:`train_dp_digits`.

    Attributes:
        target: The target ε (0: no DP).
        monitor: The core monitor of the run (closed).
        engine: Opacus's ``PrivacyEngine``; ``None`` without DP.
        epochs: Epochs trained.
        steps_per_epoch: Optimizer steps per epoch.
        accuracy: Accuracy on the test digits.
        seconds: Wall-clock time of training, checks included.
        log_dir: The run's folder.
    """

    target: float
    monitor: PrivacyMonitor
    engine: Any
    epochs: int
    steps_per_epoch: int
    accuracy: float
    seconds: float
    log_dir: Path

    @property
    def last(self) -> LeakageReport | None:
        """The run's last report."""
        return self.monitor.last_report


def train_dp_digits(
    epsilon: float,
    *,
    epochs: int = EPOCHS,
    seed: int = 0,
    log_dir: str | Path = "runs/fesmia-demo-dp",
    probe: FeSMIA | None = None,
    budget: LeakageBudget | None = None,
    out: Callable[[str], None] = print,
) -> DPRun:
    """Train the digits MLP with DP-SGD at target ``epsilon`` (0: without DP), checked per epoch.

    A plain loop; the monitor is attached to the optimizer
    (:func:`fesmia_hooks.integrations.torch.attach`) and checks after each epoch's last
    step. Opacus's ``make_private_with_epsilon`` sizes the noise so that ``epochs`` epochs
    spend ``epsilon`` for δ = :data:`DELTA` (RDP accountant); the monitor reads the privacy
    engine at every check.

    Args:
        epsilon: Target ε of the run; 0 trains without DP.
        epochs: Epochs to train.
        seed: Seed of the split, the coins, the model, the batches, the noise and the probe.
        log_dir: Folder of the run's TensorBoard events and history.
        probe: The probe (default ``FeSMIA(seed=seed)``).
        budget: The monitor's budget; ``None`` only watches.
        out: Where the per-check lines go.
    """
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0 (0: no DP), got {epsilon}")
    from fesmia_hooks.integrations.torch import attach

    torch.manual_seed(seed)
    data = load_audit_digits(seed=seed)
    model: nn.Module = digits_mlp()
    net = model
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    loader = DataLoader(TensorDataset(*data.train), batch_size=BATCH_SIZE, shuffle=True)
    engine = None
    if epsilon > 0:
        opacus = import_opacus()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")  # a demo
            # the noise search tries multipliers whose RDP optimum lies past Opacus's orders
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            engine = opacus.PrivacyEngine(accountant="rdp")
            model, optimizer, loader = engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
                target_delta=DELTA, epochs=epochs, max_grad_norm=MAX_GRAD_NORM,
            )
    steps = len(loader)  # a Poisson loader draws len(loader) batches per epoch too
    monitor = PrivacyMonitor(data.canaries, probe=probe if probe is not None else FeSMIA(seed=seed),
                             accountant=engine, delta=DELTA, budget=budget, log_dir=log_dir)
    start = time.perf_counter()
    trained = 0
    with warnings.catch_warnings(), attach(model, optimizer, monitor, every_n_steps=steps,
                                           total_steps=epochs * steps) as watch:
        # Opacus's backward hook on a first layer whose input needs no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(epochs):
            model.train()
            for inputs, targets in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(inputs), targets).backward()
                optimizer.step()  # the monitor checks after the epoch's last step
            trained = epoch + 1
            report = monitor.last_report
            if report is not None and report.step == trained * steps:
                out(format_check(report, epoch))
            if watch.should_stop:
                break
    seconds = time.perf_counter() - start
    monitor.close()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(data.test[0]).argmax(1) == data.test[1]).float().mean())
    return DPRun(epsilon, monitor, engine, trained, steps, accuracy, seconds, Path(log_dir))


def _name(target: float) -> str:
    return "non-private" if target == 0 else f"eps{target:g}"


def run_dp_demo(
    *,
    log_dir: str | Path = "runs/fesmia-demo-dp",
    epochs: int = EPOCHS,
    seed: int = 0,
    out: Callable[[str], None] = print,
    targets: Sequence[float] = TARGETS,
) -> list[DPRun]:
    """Train the digits MLP at each target ε (0: without DP) and print both ε per run.

    Each run writes its TensorBoard events and history into ``log_dir/eps<ε>`` (or
    ``log_dir/non-private``), so ``tensorboard --logdir log_dir`` shows them side by side.
    Runs on one CPU thread (restored on return): on a shared two-core machine this small
    model trains several times faster so.

    Raises:
        ImportError: Without Opacus (naming ``pip install 'fesmia-hooks[dp]'``) or
            scikit-learn.
    """
    import_opacus()  # before any training: a missing extra is one clear line
    with one_torch_thread():
        return _run(Path(log_dir), epochs=epochs, seed=seed, out=out, targets=targets)


def _run(log_dir: Path, *, epochs: int, seed: int, out: Callable[[str], None],
         targets: Sequence[float]) -> list[DPRun]:
    out(f"fesmia-hooks demo (DP): digits MLP trained with Opacus DP-SGD at target ε "
        f"{', '.join(f'{t:g}' for t in targets if t > 0)} (δ {DELTA:g}) and without DP, "
        f"{epochs} epochs each")
    runs = []
    for target in targets:
        name = _name(target)
        out("")
        out(f"{name}: " + ("SGD without DP" if target == 0 else
                           f"DP-SGD, noise sized for ε {target:g} after {epochs} epochs"))
        runs.append(train_dp_digits(target, epochs=epochs, seed=seed, log_dir=log_dir / name,
                                    out=lambda line: out("  " + line)))
    canaries = len(runs[0].monitor.canaries) if runs else 0
    out("")
    out(f"{'run':<12} {'ε accountant':>12} {'ε lower bound':>13} {'Log-MIA strict (chance)':>24} "
        f"{'test acc':>8} {'seconds':>7}")
    for run in runs:
        last = run.last
        if last is None:
            out(f"{_name(run.target):<12} (no check)")
            continue
        accountant = "-" if math.isnan(last.epsilon_accountant) else (
            f"{last.epsilon_accountant:.2f}")
        out(f"{_name(run.target):<12} {accountant:>12} {last.epsilon_lower_bound:>13.2f} "
            f"{f'{last.strict:.2f} ({last.chance_strict:.2f})':>24} {run.accuracy:>8.3f} "
            f"{run.seconds:>7.1f}")
    if canaries:
        out(f"ε lower bound: the one-run audit at 95% confidence, δ {DELTA:g}, from {canaries} "
            f"canaries (which can prove at most ε {best_attainable_epsilon(canaries):.2f}); it "
            "must stay below the accountant's ε.")
    out(f"TensorBoard: tensorboard --logdir {log_dir}")
    return runs
