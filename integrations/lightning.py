"""PyTorch Lightning adapter: a ``Callback`` over the shared driver and the core monitor.

The callback is Lightning's hooks only (what every adapter shares is
:class:`fesmia_hooks.integrations.driver.MonitorDriver`). It runs the core monitor at the
end of every n-th training epoch (or every n optimizer steps) on the model's own device,
logs the report's scalars with ``pl_module.log`` so that every attached logger,
``trainer.callback_metrics`` and Lightning's own ``EarlyStopping`` / ``ModelCheckpoint`` see
them, writes the rich TensorBoard content through the trainer's ``TensorBoardLogger`` (or
its own event file), writes the history into the logger's folder (any logger, or the
trainer's ``default_root_dir`` without one), and acts on the core's decision: the stop is
reduced over all ranks (any rank that wants to stop stops them all), and only global rank
zero writes files.

Needs ``lightning>=2`` (or ``pytorch_lightning>=2``): ``pip install 'fesmia-hooks[lightning]'``.
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from typing import Any

from fesmia_hooks.integrations.driver import MonitorDriver
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


class PrivacyMonitor(MonitorDriver, _Callback):  # type: ignore[misc]
    """Lightning callback that watches privacy leakage while the model trains.

    A thin adapter over the core :class:`fesmia_hooks.PrivacyMonitor` (see there for the probe,
    the run-level calibrated significance and the budget). At the end of every
    ``every_n_epochs``-th training epoch (or every ``every_n_steps`` optimizer steps) it runs
    the probe on the training device, without touching training, and:

    * logs every ``privacy/<key>`` of :func:`fesmia_hooks.sinks.scalar_metrics` with
      ``pl_module.log``, so the keys reach every logger and ``trainer.callback_metrics``
      and can drive ``EarlyStopping`` or ``ModelCheckpoint``;
    * on global rank zero, writes the JSON-lines history ``privacy_history.jsonl`` into
      ``trainer.log_dir`` (the logger's folder, or ``default_root_dir`` without a logger)
      unless ``log_dir`` is given, and the rich TensorBoard content (histograms, PR curve,
      summary text, custom-scalars layout) through the trainer's ``TensorBoardLogger`` (its
      scalars are left to the logger, so no tag is written twice) or, without one, into
      its own event file in that folder;
    * when the budget asks to stop, reduces the decision over all ranks (any rank stops them
      all) and sets ``trainer.should_stop`` without clearing anyone else's stop.

    Every ``fit`` is a new run (fresh history, run id and run-level test) unless it resumes
    from a checkpoint holding this callback's state. The horizon of the run-level test comes
    from whichever limit ends the run first (``max_epochs``, ``max_steps``), unless
    ``horizon`` fixes it.

    The callback can be configured from a ``LightningCLI`` file (needs
    ``jsonargparse[signatures]``); every option of the core monitor is a typed ``init_args``
    key. The canaries can be an importable factory ``canaries: "package.module:function"``,
    or be left out when the datamodule (or the LightningModule) has a ``canaries`` attribute
    or method; they are read at the start of ``fit``::

        trainer:
          callbacks:
            - class_path: fesmia_hooks.integrations.lightning.PrivacyMonitor
              init_args:
                canaries: "my_project.data:make_canaries"
                every_n_epochs: 1
                alpha: 0.05
                budget:
                  class_path: fesmia_hooks.LeakageBudget
                  init_args: {max_level: low}

    ``ModelCheckpoint`` file names with a ``privacy/...`` key: the ``/`` would make a
    folder; use ``auto_insert_metric_name=False`` and name the key yourself, e.g.
    ``filename="epoch{epoch}-strict{privacy/log_mia_strict:.2f}"``.

    Args:
        canaries: The canary set, an importable factory ``"package.module:function"``, or
            ``None`` to read ``datamodule.canaries`` (or ``pl_module.canaries``) at the
            start of ``fit``.
        monitor: A ready core :class:`fesmia_hooks.PrivacyMonitor` instead of the options.
        log_dir: Folder of the history (and TensorBoard content) instead of
            ``trainer.log_dir``.
        tensorboard: Write histograms, PR curve, summary text and the custom-scalars layout
            to TensorBoard. ``False`` leaves TensorBoard to the logged scalars.
        **options: Options of the core :class:`fesmia_hooks.PrivacyMonitor` (``probe``,
            ``budget``, ``every_n_epochs``, ``every_n_steps``, ``sinks``,
            ``restore_safe_weights``, ``on_error``, ``alpha``, ``horizon``, ``bands``).

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
        ...     "privacy/share_beyond_chance", mode="max", stopping_threshold=0.3,
        ...     patience=10**9)  # the threshold alone stops it
        >>> trainer = pl.Trainer(max_epochs=100, callbacks=[monitor, stop])  # doctest: +SKIP
        >>> trainer.fit(model, train_loader)  # doctest: +SKIP
        >>> monitor.stopped_epoch, monitor.stop_reason  # doctest: +SKIP
        (8, <StopReason.LEVEL_EXCEEDED: 'level_exceeded'>)
    """

    # No __init__ here: the driver's is the one constructor of every adapter, and its
    # ``**options`` go straight to the core monitor, whose signature is the one list of
    # options. LightningCLI's parser (jsonargparse) reads that forwarding in the driver's
    # source and offers the core's parameters, with their types, defaults and docs, as
    # ``init_args``; a mirrored signature here would be a second list to keep in step.
    # tests/test_lightning_cli.py runs LightningCLI on a configuration file to hold this.

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint."""
        return self._generate_state_key(
            every_n_epochs=self.monitor.every_n_epochs, every_n_steps=self.monitor.every_n_steps
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Under several processes, silence Lightning's advice to sync our (equal) values."""
        if stage == "fit" and trainer.world_size > 1:
            # Every rank computes the same values, so syncing them would only add collectives
            # (and could hang if one rank's check failed).
            warnings.filterwarnings(
                "ignore", message=r".*self\.log\('" + PREFIX + r".*sync_dist=True"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the run (or continue the one restored from the checkpoint)."""
        folder = trainer.log_dir  # every rank asks: it may broadcast
        tb_logger = next((lg for lg in trainer.loggers if _is_tensorboard_logger(lg)), None)
        self.begin_run(
            rank_zero=bool(trainer.is_global_zero),
            log_dir=folder,
            writer=None if tb_logger is None else tb_logger.experiment,
            scalars=tb_logger is None,
            max_epochs=trainer.max_epochs,
            max_steps=trainer.max_steps,
            steps_per_epoch=_steps_per_epoch(trainer),
            canary_sources=(getattr(trainer, "datamodule", None), pl_module),
            model=pl_module,
            fresh=trainer.global_step == 0 and trainer.current_epoch == 0,
        )
        if self.should_stop:  # a stop restored with the checkpoint, or decided at resume
            trainer.should_stop = True

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Flush and close the sinks this callback opened."""
        if stage == "fit":
            self.end_run()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Land an asynchronous check still running: its values reach the loggers too."""
        report = self.monitor.land()
        if report is not None:
            _to_loggers(trainer, scalar_metrics(report), report.step or trainer.global_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training failed: record a check still pending (nothing acts on it), close the sinks."""
        self.abort_run()

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
    def _check(self, trainer: Any, pl_module: Any, *, on_step: bool) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        if not self.is_due(epoch=epoch, step=step):
            return
        report = self.run_check(pl_module, epoch=epoch, step=step)
        if report is not None:
            self._log_scalars(trainer, pl_module, scalar_metrics(report), on_step=on_step,
                              step=step if report.step is None else report.step)
        # Every rank reaches this point at the same checks and landings (the epoch end or step
        # after an asynchronous check), so the collective cannot hang.
        reduce = trainer.strategy.reduce_boolean_decision
        if self.reduce_stop(lambda flag: reduce(flag, all=False), epoch=epoch):
            if not trainer.should_stop and trainer.is_global_zero:
                log.info("fesmia-hooks: stopping training after epoch %d (%s)", epoch,
                         self.stop_reason.value)
            trainer.should_stop = True

    def _log_scalars(
        self, trainer: Any, pl_module: Any, metrics: dict[str, float], *, on_step: bool,
        step: int,
    ) -> None:
        if not on_step:
            for key, value in metrics.items():
                pl_module.log(key, value, on_step=False, on_epoch=True, batch_size=1)
            return
        # Step-logged values reach the loggers only every `log_every_n_steps`; give them to
        # the loggers directly at the check's step instead (an asynchronous check's own step,
        # the one before it landed), and to callback_metrics only here.
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, logger=False, batch_size=1)
        _to_loggers(trainer, metrics, step)


def _to_loggers(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """``metrics`` straight to every logger of the trainer, at ``step``, from rank zero."""
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_metrics(dict(metrics), step=step)


def _steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps per epoch, when the trainer knows it (a sized loader)."""
    batches = getattr(trainer, "num_training_batches", None)
    if not isinstance(batches, (int, float)) or not math.isfinite(batches) or batches <= 0:
        return None
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    return max(1, math.ceil(batches / accumulate))
