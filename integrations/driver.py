"""What every framework adapter shares: one driver under all of them.

The Lightning, Keras, Hugging Face and plain-torch adapters all sit on this driver.

An adapter is its framework's hooks and nothing else. :class:`MonitorDriver` owns the rest,
once:

* **building the core monitor** from the same keyword options in every adapter (those of
  :class:`fesmia_hooks.PrivacyMonitor`: ``probe``, ``budget``, ``every_n_epochs``,
  ``every_n_steps``, ``sinks``, ``restore_safe_weights``, ``on_error``, ``alpha``,
  ``horizon``, ``bands``), or taking a ready one (``monitor=``);
* **canaries** given as a set, an importable factory (``"package.module:function"``, for
  configuration files), a callable, or left to the framework (a datamodule's or model's
  ``canaries`` attribute);
* **one rule for when a run starts**: every ``fit`` / ``train`` call is a new run (a fresh
  history, run id, budget counters and run-level test) unless it resumes: from the
  framework's checkpoint, or from a state given to :meth:`MonitorDriver.load_state_dict`
  before it started;
* **the horizon** of the run-level test, from whichever limit ends the run first
  (:func:`fesmia_hooks.calibration.expected_checks`);
* **rank-zero output**: only the process that writes (rank zero) opens the history,
  TensorBoard and the user's sinks; every rank makes the same checks and decisions;
* **the reduced stop**: a stop wanted on any rank stops every rank, and the read-only stop
  state (:attr:`MonitorDriver.should_stop`, :attr:`MonitorDriver.stopped_epoch`, ...).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fesmia_hooks._validation import boolean, optional_path
from fesmia_hooks.budget import StopReason
from fesmia_hooks.calibration import expected_checks
from fesmia_hooks.canaries import Canaries
from fesmia_hooks.exceptions import ConfigurationError, PrivacyBudgetExceeded
from fesmia_hooks.monitor import PrivacyMonitor
from fesmia_hooks.report import LeakageReport

__all__ = ["CanarySource", "MonitorDriver", "load_canaries"]

#: How an adapter may be given its canaries.
CanarySource = Canaries | str | Callable[[], Canaries] | None


def load_canaries(source: str | Callable[[], Any]) -> Canaries:
    """Build a canary set from an importable factory ``"package.module:function"`` or a callable.

    Raises:
        ConfigurationError: When the factory cannot be imported or found, or does not return
            a canary set.

    Example:
        >>> load_canaries("no_such_module:make")
        Traceback (most recent call last):
        ...
        fesmia_hooks.exceptions.ConfigurationError: `canaries` factory 'no_such_module:make' cannot be imported: No module named 'no_such_module'
    """  # noqa: E501
    if isinstance(source, str):
        module_name, _, name = source.partition(":")
        if not module_name or not name:
            raise ConfigurationError(
                f"`canaries` as a string must be 'package.module:function', got {source!r}"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigurationError(
                f"`canaries` factory {source!r} cannot be imported: {exc}"
            ) from exc
        factory = getattr(module, name, None)
        if not callable(factory):
            raise ConfigurationError(
                f"`canaries` factory {source!r}: {module_name} has no callable {name!r}"
            )
    else:
        factory = source
    made = factory()
    if not isinstance(made, Canaries):
        raise ConfigurationError(
            f"the `canaries` factory must return a CanarySet or SequenceCanarySet, "
            f"got {type(made).__name__}"
        )
    return made


class MonitorDriver:
    """The part of every adapter that is not its framework's hooks.

    An adapter subclasses it first and its framework's callback class second
    (``class PrivacyMonitor(MonitorDriver, Callback)``): it inherits this constructor, so
    every adapter takes the same arguments, and adds only its hooks.

    Args:
        canaries: The canary set; an importable factory ``"package.module:function"`` or a
            callable returning one (built when the run starts); or ``None`` to take it from
            the framework when the run starts (see the adapter).
        monitor: A ready :class:`fesmia_hooks.PrivacyMonitor`, instead of ``canaries`` and
            ``options``.
        log_dir: Where the history and TensorBoard content go; ``None`` lets the adapter
            choose (its framework's folder) or writes nothing.
        tensorboard: Write TensorBoard content (histograms, PR curve, summary text, the
            custom-scalars layout, and scalars unless the framework's logger writes them).
            ``None``: yes, or as a ready ``monitor`` was built.
        **options: Options of :class:`fesmia_hooks.PrivacyMonitor`.

    Raises:
        ConfigurationError: On a bad option, or both ``monitor`` and options.
    """

    monitor: PrivacyMonitor

    def __init__(
        self,
        canaries: CanarySource = None,
        *,
        monitor: PrivacyMonitor | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        tensorboard: bool | None = None,
        **options: Any,
    ) -> None:
        optional_path("log_dir", log_dir)
        if tensorboard is not None:
            boolean("tensorboard", tensorboard)
        self._canary_source: str | Callable[[], Any] | None = None
        if monitor is not None:
            if not isinstance(monitor, PrivacyMonitor):
                raise ConfigurationError(
                    f"`monitor` must be a fesmia_hooks.PrivacyMonitor, got {type(monitor).__name__}"
                )
            given = sorted(options) + (["canaries"] if canaries is not None else [])
            if given:
                raise ConfigurationError(
                    f"give a ready `monitor` or the options to build one, got both: {given}"
                )
            self.monitor = monitor
        else:
            ready = canaries if isinstance(canaries, Canaries) else None
            if canaries is not None and ready is None:
                if not isinstance(canaries, str) and not callable(canaries):
                    raise ConfigurationError(
                        "`canaries` must be a CanarySet, a SequenceCanarySet, a factory "
                        f"'package.module:function', a callable or None, got "
                        f"{type(canaries).__name__}"
                    )
                self._canary_source = canaries
            self.monitor = PrivacyMonitor(ready, log_dir=None, **options)
        self.log_dir = None if log_dir is None else Path(log_dir)
        # A ready monitor's own folder and TensorBoard choice win over the framework's.
        self._own_log_dir = None if monitor is None else monitor.log_dir
        self.tensorboard = (
            tensorboard if tensorboard is not None
            else (monitor.tensorboard if monitor is not None else True)
        )
        self._reduced_stop_epoch: int | None = None
        # An asynchronous check started at the last epoch end or step: it lands at the next.
        self._landing = False
        self._stopped_at_begin = False
        super().__init__()  # the framework's callback class, next in an adapter's MRO

    # ------------------------------------------------------------------ read-only state
    @property
    def history(self) -> list[LeakageReport]:
        """Every check's report of the current run, oldest first."""
        return self.monitor.history

    @property
    def last_report(self) -> LeakageReport | None:
        """The latest check's report, if any."""
        return self.monitor.last_report

    @property
    def should_stop(self) -> bool:
        """Whether the budget asked to stop, on this process or (reduced) on any."""
        return self.monitor.should_stop or self._reduced_stop_epoch is not None

    @property
    def stop_reason(self) -> StopReason:
        """Which budget rule asked to stop (``StopReason.NOT_STOPPED`` if none did)."""
        return self.monitor.stop_reason

    @property
    def stop_message(self) -> str:
        """The budget's sentence about the stop, with the numbers; empty if none."""
        return self.monitor.stop_message

    @property
    def stopped_step(self) -> int | None:
        """The optimizer step whose check stopped training, when checks go by steps."""
        return self.monitor.stopped_step

    @property
    def stopped_epoch(self) -> int | None:
        """The epoch (from 0) whose check stopped training, or ``None``."""
        if self.monitor.stopped_epoch is not None:
            return self.monitor.stopped_epoch
        return self._reduced_stop_epoch

    # ------------------------------------------------------------------ the run
    def begin_run(
        self,
        *,
        rank_zero: bool = True,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        scalars: bool = True,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        steps_per_epoch: int | None = None,
        canary_sources: Iterable[Any] = (),
        model: Any = None,
        fresh: bool = True,
    ) -> None:
        """Start a run, or continue the one whose state was loaded: the one rule of every adapter.

        A run continues when :meth:`load_state_dict` was called since the last run began
        (by the framework restoring its checkpoint, or by you); otherwise it is new: a
        fresh history, run id, budget counters, and a run-level test whose horizon comes
        from the run's limits (unless the monitor fixed one).

        Args:
            rank_zero: This process writes the outputs.
            log_dir: The framework's folder, used when no ``log_dir`` was given.
            writer: A ``SummaryWriter`` of the framework's to write TensorBoard content
                through.
            scalars: Write scalars to TensorBoard (off when the framework's logger does).
            max_epochs: The run's epoch limit, if any.
            max_steps: The run's optimizer-step limit, if any.
            steps_per_epoch: Optimizer steps per epoch, if known.
            canary_sources: Objects whose ``canaries`` attribute (a canary set, or a
                callable returning one) may hold the canaries when none were given.
            model: The model about to be trained: a new run checks it before training
                (:meth:`fesmia_hooks.PrivacyMonitor.preflight`).
            fresh: Training starts from step 0. A new run on a model already trained (a
                framework resuming without this monitor's state) skips the pre-flight check:
                a model that has memorised would fail it for the wrong reason.

        Raises:
            CanaryError: When the pre-flight check finds the split not exchangeable (with
                the monitor's ``preflight="error"``).
        """
        core = self.monitor
        if core.canaries is None:
            core.set_canaries(self._find_canaries(canary_sources))
        folder = next(
            (f for f in (self.log_dir, self._own_log_dir, log_dir) if f is not None), None
        )
        new_run = not core.restored
        if new_run:
            core.reset(horizon=expected_checks(
                every_n_epochs=core.every_n_epochs,
                every_n_steps=core.every_n_steps,
                max_epochs=max_epochs,
                max_steps=max_steps,
                steps_per_epoch=steps_per_epoch,
            ))
            self._reduced_stop_epoch = None
            self._landing = False
        core.writes = rank_zero
        if rank_zero:
            use_writer = writer if self.log_dir is None else None
            core.set_log_dir(folder, tensorboard=self.tensorboard, writer=use_writer,
                             scalars=scalars or use_writer is None)
        else:
            core.set_log_dir(None)
        core.restored = False
        if new_run and fresh and model is not None:
            core.preflight(model)
        if not new_run and model is not None:
            # the check that was running when the checkpoint was saved: run again on the
            # restored weights; its decision lands at the first epoch end or step
            try:
                core.resume_check(model)
            except PrivacyBudgetExceeded:
                self.end_run()  # action="raise": the run ends here, its outputs closed
                raise
            self._landing = True
        self._stopped_at_begin = core.should_stop

    def _find_canaries(self, sources: Iterable[Any]) -> Canaries:
        if self._canary_source is not None:
            return load_canaries(self._canary_source)
        for source in sources:
            found = getattr(source, "canaries", None)
            if found is None:
                continue
            if callable(found) and not isinstance(found, Canaries):
                return load_canaries(found)
            if isinstance(found, Canaries):
                return found
            raise ConfigurationError(
                f"{type(source).__name__}.canaries must be a CanarySet, a SequenceCanarySet "
                f"or a method returning one, got {type(found).__name__}"
            )
        raise ConfigurationError(
            "no canaries: pass `canaries` (a set, or a factory 'package.module:function') or "
            "give the datamodule or model a `canaries` attribute"
        )

    def run_check(
        self, model: Any, *, epoch: int | None = None, step: int | None = None
    ) -> LeakageReport | None:
        """Check ``model`` if a check is due at this epoch end or step; ``None`` otherwise.

        With ``asynchronous=True`` a check's decision lands at the next epoch end (or step,
        with ``every_n_steps``): this call waits there for its attack, if still running,
        and returns its report.

        Raises:
            PrivacyBudgetExceeded: On a breach with ``action="raise"`` (on every rank alike).
        """
        landing, self._landing = self._landing, False
        if self._stopped_at_begin or not self.monitor.is_due(epoch=epoch, step=step):
            # a run that begins stopped (restored so, or stopped by the check run again at
            # its resume) starts no new check: the framework ends it at this point
            return self.monitor.land() if landing else None
        report = self.monitor.check(model, epoch=epoch, step=step)
        self._landing = self.monitor.asynchronous
        return report

    def is_due(self, *, epoch: int | None = None, step: int | None = None) -> bool:
        """Whether a check is due at this epoch end (or optimizer step), or one lands here.

        True at the epoch end or step after an asynchronous check started, whether or not
        it started well, so that every rank reaches the stop decision at the same points.
        """
        return self._landing or self.monitor.is_due(epoch=epoch, step=step)

    def reduce_stop(self, any_rank: Callable[[bool], bool], *, epoch: int | None) -> bool:
        """Whether any rank wants to stop (``any_rank`` OR-reduces a flag over the ranks).

        Every rank must call it at the same checks, so the collective cannot hang.
        """
        decision = bool(any_rank(self.monitor.should_stop))
        if decision and self._reduced_stop_epoch is None and self.monitor.stopped_epoch is None:
            self._reduced_stop_epoch = epoch
        return decision

    def end_run(self) -> None:
        """Flush and close the sinks (a later run reopens them)."""
        self.monitor.close()

    def abort_run(self) -> None:
        """Training failed: record a check still pending, without acting on it; close the sinks.

        Nothing is raised for the check (a failure, a breach): the training's own exception
        is the one that propagates. The check's report, or its failure, is in the history.
        """
        try:
            self.monitor.land(act=False)
        finally:
            self.monitor.close()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The core monitor's plain-value state (run, history, counters, test, stop)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: the next run continues that run."""
        self.monitor.load_state_dict(state_dict)
        self._reduced_stop_epoch = None
