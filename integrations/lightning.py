"""PyTorch Lightning adapter: a ``Callback`` over the core :class:`fesmia_hooks.PrivacyMonitor`.

The callback computes no measure. It runs the core monitor at the end of every n-th training
epoch (or every n optimizer steps) on the model's own device, logs the report's scalars with
``pl_module.log`` so that every attached logger, ``trainer.callback_metrics`` and Lightning's
own ``EarlyStopping`` / ``ModelCheckpoint`` see them, writes the rich TensorBoard content
(histograms, PR curve, summary text, custom-scalars layout) through the trainer's
``TensorBoardLogger`` and acts on the core's decision: the stop is reduced over all ranks
(any rank that wants to stop stops them all), and only global rank zero writes files.

Needs ``lightning>=2`` (or ``pytorch_lightning>=2``): ``pip install 'fesmia-hooks[lightning]'``.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from fesmia_hooks._validation import boolean, optional_path
from fesmia_hooks.budget import LeakageBudget
from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.monitor import PrivacyMonitor as CoreMonitor
from fesmia_hooks.monitor import RankedMonitorView
from fesmia_hooks.probe import FeSMIA
from fesmia_hooks.sinks import PREFIX, scalar_metrics

__all__ = ["PrivacyMonitor"]

log = logging.getLogger(__name__)

_INSTALL = "pip install 'fesmia-hooks[lightning]'"


def _import_lightning() -> Any:
    """``lightning.pytorch`` if it is installed (>= 2), else ``pytorch_lightning`` (>= 2)."""
    found = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        version = str(getattr(module, "__version__", "0"))
        found.append(f"{name} {version}")
        try:
            major = int(version.split(".")[0])
        except ValueError:
            major = 0
        if major >= 2:
            importlib.import_module(name + ".loggers")
            return module
    have = f" (found {', '.join(found)})" if found else ""
    raise ImportError(
        f"fesmia_hooks.integrations.lightning needs lightning>=2 or pytorch_lightning>=2{have}: "
        f"{_INSTALL}"
    )


pl = _import_lightning()
_Callback: Any = pl.Callback


def _is_tensorboard_logger(logger: Any) -> bool:
    # Matched by class name so that a TensorBoardLogger of either package is recognised.
    return any(
        cls.__name__ == "TensorBoardLogger"
        and cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
        for cls in type(logger).__mro__
    )


class PrivacyMonitor(RankedMonitorView, _Callback):  # type: ignore[misc]
    """Lightning callback that watches privacy leakage while the model trains.

    A thin adapter over the core :class:`fesmia_hooks.PrivacyMonitor` (see there for the probe,
    the run-level calibrated significance and the budget). At the end of every
    ``every_n_epochs``-th training epoch (or every ``every_n_steps`` optimizer steps) it runs
    the probe on the training device, without touching training, and:

    * logs every ``privacy/<key>`` of :func:`fesmia_hooks.sinks.scalar_metrics` with
      ``pl_module.log``, so the keys reach ``trainer.callback_metrics`` and can drive
      ``EarlyStopping(monitor="privacy/log_mia_strict", mode="max", ...)`` or
      ``ModelCheckpoint``;
    * on global rank zero, writes histograms of the canary scores, a PR curve, a summary text
      and a custom-scalars layout through the trainer's ``TensorBoardLogger`` (scalars are
      left to the logger, so no tag is written twice), and the JSON-lines history
      ``privacy_history.jsonl`` into the logger's ``log_dir``. Without a
      ``TensorBoardLogger`` both go into ``log_dir`` (nothing is written if it is ``None``);
    * when the budget asks to stop, reduces the decision over all ranks (any rank stops them
      all) and sets ``trainer.should_stop`` without clearing anyone else's stop.

    Lightning runs ``EarlyStopping`` and ``ModelCheckpoint`` after the other callbacks at the
    end of a training epoch, so they see the keys of the check made at that same epoch.

    When the budget fixes no ``horizon``, the horizon of the run-level test is set from
    ``trainer.max_epochs // every_n_epochs`` (or ``max_steps // every_n_steps``) in
    :meth:`setup`. The monitor's state (history, counters, run-level test, stop state) is
    saved in checkpoints; a run resumed with ``trainer.fit(..., ckpt_path=...)`` continues it.

    Args:
        canaries: The canary set: members inside the training data, non-members outside.
        probe: The probe; ``FeSMIA()`` when omitted.
        budget: The leakage budget; ``None`` only measures and logs.
        log_dir: Folder for TensorBoard events and the history when the trainer has no
            ``TensorBoardLogger``; ignored when it has one.
        every_n_epochs: Check after every n-th training epoch (counted from 0, so the first
            check follows epoch ``n - 1``).
        every_n_steps: Check every n optimizer steps (``trainer.global_step``) instead. The
            scalars then reach the loggers at the check's step, whatever
            ``log_every_n_steps`` is.
        restore_safe_weights: On a stop, load back the last weights that were within budget.
        on_error: ``"warn"`` records a failed check and carries on; ``"raise"`` re-raises.
        log_rich: Write histograms, PR curve, summary text and the custom-scalars layout to
            TensorBoard. ``False`` leaves TensorBoard to the logged scalars.

    Raises:
        ConfigurationError: On an argument outside its allowed range.

    Example:
        A trainer run, so not executed as a doctest (``canaries``, ``model`` and
        ``train_loader`` are yours):

        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> from fesmia_hooks import FeSMIA, LeakageBudget  # doctest: +SKIP
        >>> from fesmia_hooks.integrations.lightning import PrivacyMonitor  # doctest: +SKIP
        >>> monitor = PrivacyMonitor(canaries, probe=FeSMIA(),  # doctest: +SKIP
        ...                          budget=LeakageBudget(max_level="low"))
        >>> stop = pl.callbacks.EarlyStopping(  # doctest: +SKIP
        ...     "privacy/log_mia_strict", mode="max", stopping_threshold=0.75)
        >>> trainer = pl.Trainer(max_epochs=100, callbacks=[monitor, stop])  # doctest: +SKIP
        >>> trainer.fit(model, train_loader)  # doctest: +SKIP
        >>> monitor.stopped_epoch, monitor.stop_reason  # doctest: +SKIP
        (8, <StopReason.LEVEL_EXCEEDED: 'level_exceeded'>)
    """

    def __init__(
        self,
        canaries: CanarySet,
        *,
        probe: FeSMIA | None = None,
        budget: LeakageBudget | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        restore_safe_weights: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
        log_rich: bool = True,
    ) -> None:
        super().__init__()
        optional_path("log_dir", log_dir)
        boolean("log_rich", log_rich)
        # Sinks are decided in `setup`, once the trainer (its loggers, its rank) is known.
        self.monitor = CoreMonitor(
            canaries,
            probe=probe,
            budget=budget,
            log_dir=None,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            restore_safe_weights=restore_safe_weights,
            on_error=on_error,
        )
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.log_rich = log_rich
        self._reduced_stop_epoch: int | None = None

    # ------------------------------------------------------------------ public state
    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint."""
        return self._generate_state_key(
            every_n_epochs=self.monitor.every_n_epochs, every_n_steps=self.monitor.every_n_steps
        )

    def state_dict(self) -> dict[str, Any]:
        """The core monitor's plain-value state (history, counters, run-level test, stop)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, so a resumed run continues the same history."""
        self.monitor.load_state_dict(state_dict)
        self._reduced_stop_epoch = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Decide the sinks (rank zero only) and the horizon of the run-level test."""
        if stage != "fit":
            return
        self._attach_sinks(trainer)
        self._set_horizon(trainer)
        if trainer.world_size > 1:
            # Every rank computes the same values, so syncing them would only add collectives
            # (and could hang if one rank's check failed); silence Lightning's advice for our keys.
            warnings.filterwarnings(
                "ignore", message=r".*self\.log\('" + PREFIX + r".*sync_dist=True"
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Flush and close the sinks this callback opened."""
        if stage == "fit":
            self.monitor.close()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Check after every ``every_n_epochs``-th epoch."""
        if trainer.sanity_checking or self.monitor.every_n_epochs is None:
            return
        self._check(trainer, pl_module, on_step=False)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Check every ``every_n_steps`` optimizer steps."""
        if trainer.sanity_checking or self.monitor.every_n_steps is None:
            return
        self._check(trainer, pl_module, on_step=True)

    # ------------------------------------------------------------------ internals
    def _attach_sinks(self, trainer: Any) -> None:
        core = self.monitor
        if not trainer.is_global_zero:
            core.set_log_dir(None)
            return
        tb_logger = next((lg for lg in trainer.loggers if _is_tensorboard_logger(lg)), None)
        if tb_logger is not None:
            if self.log_dir is not None:
                log.info("fesmia-hooks: writing through the TensorBoardLogger; `log_dir` unused")
            # Lightning's logger already writes the scalars (through pl_module.log).
            core.set_log_dir(tb_logger.log_dir, tensorboard=self.log_rich,
                             writer=tb_logger.experiment, scalars=False)
        else:
            core.set_log_dir(self.log_dir, tensorboard=self.log_rich)

    def _set_horizon(self, trainer: Any) -> None:
        """A new ``fit`` is a new run (fresh history and alpha); a resumed one is not."""
        core = self.monitor
        if getattr(trainer, "ckpt_path", None) is not None:
            return  # load_state_dict restores the run being resumed
        horizon = None
        if core.budget is None or core.budget.horizon is None:
            most: int | None = trainer.max_epochs
            every: int | None = core.every_n_epochs
            if every is None:
                most, every = trainer.max_steps, core.every_n_steps
            if most is not None and every is not None and most > 0:
                horizon = max(1, most // every)
        core.reset(horizon=horizon)
        self._reduced_stop_epoch = None

    def _check(self, trainer: Any, pl_module: Any, *, on_step: bool) -> None:
        core = self.monitor
        epoch, step = trainer.current_epoch, trainer.global_step
        if not core.is_due(epoch=epoch, step=step):
            return
        # Raises PrivacyBudgetExceeded on a breach with action="raise" (on every rank alike).
        report = core.check(pl_module, epoch=epoch, step=step)
        if report is not None:
            self._log_scalars(trainer, pl_module, scalar_metrics(report), on_step=on_step)
        # Every rank reaches this point at the same checks, so the collective cannot hang.
        decision = bool(trainer.strategy.reduce_boolean_decision(core.should_stop, all=False))
        if decision:
            if not trainer.should_stop and trainer.is_global_zero:
                log.info("fesmia-hooks: stopping training after epoch %d (%s)", epoch,
                         core.stop_reason.value)
            if self._reduced_stop_epoch is None and core.stopped_epoch is None:
                self._reduced_stop_epoch = epoch
        trainer.should_stop = trainer.should_stop or decision

    def _log_scalars(
        self, trainer: Any, pl_module: Any, metrics: dict[str, float], *, on_step: bool
    ) -> None:
        if not on_step:
            for key, value in metrics.items():
                pl_module.log(key, value, on_step=False, on_epoch=True, batch_size=1)
            return
        # Step-logged values reach the loggers only every `log_every_n_steps`; give them to
        # the loggers directly at the check's step instead, and to callback_metrics only here.
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, logger=False, batch_size=1)
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(dict(metrics), step=trainer.global_step)
