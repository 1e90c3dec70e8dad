"""Plain PyTorch loops: watch a hand-written training loop with a :class:`PrivacyMonitor`.

There are two ways to drive the core monitor from a loop you wrote yourself.

**Per epoch (the simplest).** Call :meth:`PrivacyMonitor.step` after each epoch and act on
:attr:`PrivacyMonitor.should_stop`; nothing is attached to anything::

    monitor = PrivacyMonitor(canaries, budget=LeakageBudget(max_level="low"), log_dir="runs/a")
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        monitor.step(model, epoch=epoch)
        if monitor.should_stop:
            break

**Per optimizer step, without touching the loop.** :func:`attach` registers an optimizer
step post-hook (``optimizer.register_step_post_hook``): every ``optimizer.step()`` that is
actually taken counts one step ``n`` (1, 2, ...) and calls ``monitor.step(model, step=n)``;
the monitor's ``every_n_steps`` cadence decides whether a check runs. The loop only needs to
read :attr:`AttachedMonitor.should_stop` if it wants to stop (with ``action="raise"`` the
:class:`~fesmia_hooks.PrivacyBudgetExceeded` comes out of ``optimizer.step()`` itself).
Steps skipped by a ``GradScaler`` never reach the hook and are not counted. An Opacus
``DPOptimizer`` (differentially private SGD) has no hook registry of its own: the hook goes on
the optimizer it wraps, whose ``step()`` it calls once per step taken, after clipping, noise
and the accountant's count (a skipped virtual step of Opacus's ``BatchMemoryManager`` is not
counted).

Attaching starts a run, as ``fit`` does in the other integrations: the monitor's history,
run id, budget counters and run-level test start afresh (with the horizon
``total_steps // every_n_steps`` when ``total_steps`` is given), unless a state was loaded
with ``monitor.load_state_dict(...)`` since its last run, which the attached run continues:
same run id, history and thresholds, with the check numbers going on from the state's.
To resume a loop, save ``monitor.state_dict()`` with your checkpoint and attach again with
the step count the checkpoint was taken at::

    monitor.load_state_dict(checkpoint["privacy"])
    watch = attach(model, optimizer, monitor, start_step=checkpoint["step"])

Only rank zero of a ``torch.distributed`` run writes outputs (the history, TensorBoard and
the monitor's sinks); every rank makes the same checks. The monitor's own ``log_dir`` and
its choice of TensorBoard are kept.

The check runs on the model as it is right after the update, in eval mode, without
gradients and with the global RNG forked (see :func:`fesmia_hooks.untouched`): the loop
trains exactly as it would without the hook. This module computes nothing itself; it
translates the optimizer's hook into a call of the core monitor through the shared driver
(:class:`fesmia_hooks.integrations.driver.MonitorDriver`).

In a ``DistributedDataParallel`` loop every rank runs its own hook and check on its replica;
attach it on one rank only, or give every rank the same canaries and probe seed.

Example:
    >>> import torch
    >>> from fesmia_hooks import CanarySet, FeSMIA
    >>> from fesmia_hooks.integrations.torch import PrivacyMonitor, attach
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    >>> canaries = CanarySet(members=(x[:32], y[:32]), non_members=(x[32:64], y[32:64]))
    >>> model = torch.nn.Linear(8, 3)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> monitor = PrivacyMonitor(canaries, probe=FeSMIA(episodes=20, permutations=99),
    ...                          every_n_steps=4)
    >>> train_x, train_y = torch.cat([x[:32], x[64:]]), torch.cat([y[:32], y[64:]])
    >>> with attach(model, optimizer, monitor) as watch:
    ...     for _ in range(10):
    ...         optimizer.zero_grad()
    ...         torch.nn.functional.cross_entropy(model(train_x), train_y).backward()
    ...         optimizer.step()
    ...         if watch.should_stop:
    ...             break
    >>> watch.steps, [report.step for report in monitor.history]
    (10, [4, 8])
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from fesmia_hooks._validation import optional_positive_int, positive_int
from fesmia_hooks.distributed import is_distributed
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.integrations.driver import MonitorDriver
from fesmia_hooks.monitor import PrivacyMonitor

__all__ = ["AttachedMonitor", "PrivacyMonitor", "attach"]

log = logging.getLogger(__name__)


class AttachedMonitor(MonitorDriver):
    """A monitor attached to an optimizer; returned by :func:`attach`.

    Use it as a context manager to remove the hook on exit (the monitor and its sinks stay
    open: close them with ``monitor.close()`` or ``with monitor:``). Build it with
    :func:`attach`, which checks the arguments; building it begins the monitor's run.

    Attributes:
        monitor: The core :class:`PrivacyMonitor` that runs the checks.
        model: The model checked.
        optimizer: The optimizer whose steps are counted.
        steps: Optimizer steps counted so far (``start_step`` included).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        monitor: PrivacyMonitor,
        *,
        start_step: int,
        total_steps: int | None = None,
    ) -> None:
        hooked = _hooked(optimizer)  # before the run begins: a refusal starts nothing
        MonitorDriver.__init__(self, monitor=monitor)
        self.model = model
        self.optimizer = optimizer
        self.steps = start_step
        rank_zero = not is_distributed() or torch.distributed.get_rank() == 0
        self.begin_run(rank_zero=rank_zero, max_steps=_steps_for_horizon(
            monitor, start_step=start_step, total_steps=total_steps), model=model,
            fresh=start_step == 0)
        self._handle: Any = hooked.register_step_post_hook(self._on_step)

    def _on_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        self.run_check(self.model, step=self.steps)

    @property
    def attached(self) -> bool:
        """Whether the hook is still registered."""
        return self._handle is not None

    def remove(self) -> None:
        """Unregister the hook; later ``optimizer.step()`` calls are neither counted nor checked.

        The outputs of the checks made so far are written before it returns. Calling it
        again does nothing.
        """
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self.monitor.flush()

    def __enter__(self) -> AttachedMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return (
            f"AttachedMonitor({state}, steps={self.steps}, "
            f"every_n_steps={self.monitor.every_n_steps}, checks={self.monitor.checks})"
        )


def attach(
    model: nn.Module,
    optimizer: Optimizer,
    monitor: PrivacyMonitor,
    *,
    every_n_steps: int | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
) -> AttachedMonitor:
    """Check ``model`` every n-th ``optimizer.step()`` of a hand-written loop.

    The cadence is the monitor's own ``every_n_steps``. A monitor built on the epoch
    cadence (the default, ``every_n_epochs=1``) that has not checked anything yet is switched
    to the step cadence when ``every_n_steps`` is given here; after that, ``monitor.step(model,
    epoch=e)`` no longer triggers checks. Attaching starts a new run of the monitor unless a
    state was loaded into it since its last run (see the module docstring).

    Args:
        model: The model being trained (the one whose parameters ``optimizer`` updates).
        optimizer: Any ``torch.optim.Optimizer``.
        monitor: The core monitor; its budget, sinks and probe are used as they are.
        every_n_steps: Check every n-th optimizer step. Needed when the monitor has no step
            cadence; must equal the monitor's when it has one.
        start_step: Optimizer steps already taken (when resuming); the next step counts as
            ``start_step + 1``. When the monitor continues a loaded state, at least the step
            of that state's last check.
        total_steps: The step the run ends at, when known (counted like ``steps``, from 0,
            ``start_step`` included): the run-level test of a new run then spends ``alpha``
            evenly over its checks, ``total_steps // every_n_steps`` when ``start_step`` is
            0. A run that continues a loaded state keeps that state's test.

    Returns:
        The :class:`AttachedMonitor` handle (``remove()``, ``should_stop``, context manager).

    Raises:
        ConfigurationError: On a wrong type, a cadence that is missing or disagrees with the
            monitor's, a switch to the step cadence after the monitor has made checks, a
            ``total_steps`` below ``start_step``, a ``start_step`` below the last checked
            step of a loaded state, or an optimizer that takes no step hooks and wraps none
            that does.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise ConfigurationError(
            f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(monitor, PrivacyMonitor):
        raise ConfigurationError(
            f"`monitor` must be a fesmia_hooks.PrivacyMonitor, got {type(monitor).__name__}"
        )
    every_n_steps = optional_positive_int("every_n_steps", every_n_steps)
    start_step = positive_int("start_step", start_step, minimum=0)
    total_steps = optional_positive_int("total_steps", total_steps)
    if total_steps is not None and total_steps < start_step:
        raise ConfigurationError(
            f"`total_steps` is the step the run ends at, counted from 0: it must be >= "
            f"start_step={start_step}, got {total_steps}"
        )
    if monitor.restored:
        last = _last_checked_step(monitor)
        if start_step < last:
            raise ConfigurationError(
                f"the monitor continues a loaded state whose last check was at optimizer step "
                f"{last}: pass start_step >= {last} (the steps taken when the state was "
                f"saved), got start_step={start_step}"
            )
    current = monitor.every_n_steps
    if every_n_steps is None and current is None:
        raise ConfigurationError(
            "attach() checks by optimizer steps: build the monitor with `every_n_steps=` or "
            "pass `every_n_steps` to attach(), got a monitor with "
            f"every_n_epochs={monitor.every_n_epochs} (or call monitor.step(model, epoch=e) "
            "after each epoch instead of attaching)"
        )
    if every_n_steps is not None and current is not None and every_n_steps != current:
        raise ConfigurationError(
            f"`every_n_steps` must agree with the monitor's every_n_steps={current}, "
            f"got {every_n_steps}"
        )
    if current is None:
        if monitor.checks or monitor.errors:
            raise ConfigurationError(
                "cannot switch a monitor that has already checked by epochs to "
                f"`every_n_steps={every_n_steps}`; build a new monitor with `every_n_steps=`"
            )
        log.info("fesmia-hooks: monitor switched to checking every %d optimizer steps",
                 every_n_steps)
        monitor.every_n_steps = every_n_steps
        monitor.every_n_epochs = None
    return AttachedMonitor(
        model, optimizer, monitor, start_step=start_step, total_steps=total_steps
    )


def _hooked(optimizer: Optimizer) -> Optimizer:
    """The optimizer whose step post-hooks run once per optimizer step taken.

    ``optimizer`` itself, unless it wraps another without running ``Optimizer.__init__``
    (Opacus's ``DPOptimizer`` keeps the user's optimizer as ``original_optimizer`` and has
    no hooks of its own): then the first optimizer down the chain of wrapped ones that has
    them.

    Raises:
        ConfigurationError: When no optimizer in the chain can take a step hook.
    """
    found = optimizer
    while not hasattr(found, "_optimizer_step_post_hooks"):
        inner = getattr(found, "original_optimizer", None)
        if not isinstance(inner, Optimizer) or inner is found:
            raise ConfigurationError(
                f"attach() needs an optimizer that takes step hooks (register_step_post_hook); "
                f"{type(found).__name__} has none and wraps no optimizer that does (call "
                "monitor.step(model, epoch=e) after each epoch instead)"
            )
        found = inner
    return found


def _last_checked_step(monitor: PrivacyMonitor) -> int:
    """The optimizer step of the monitor's last check (failed ones included), 0 if none."""
    steps = [r.step for r in monitor.history] + [e.get("step") for e in monitor.errors]
    return max((s for s in steps if isinstance(s, int)), default=0)


def _steps_for_horizon(
    monitor: PrivacyMonitor, *, start_step: int, total_steps: int | None
) -> int | None:
    """The ``max_steps`` whose checks are those of steps ``start_step + 1 .. total_steps``.

    The driver counts ``max_steps // every_n_steps`` checks; a run that begins at
    ``start_step`` makes ``total_steps // n - start_step // n`` of them.
    """
    every = monitor.every_n_steps
    if total_steps is None or every is None:
        return total_steps
    checks = total_steps // every - start_step // every
    return max(checks, 1) * every  # at least one check, as the driver counts
