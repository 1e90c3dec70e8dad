"""PrivacyMonitor: periodic FeS-MIA checks, a run-level calibrated budget, and its sinks."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fesmia_hooks._validation import boolean, choice, optional_path, optional_positive_int
from fesmia_hooks.budget import Decision, LeakageBudget, StopReason
from fesmia_hooks.canaries import CanarySet
from fesmia_hooks.exceptions import ConfigurationError, FesmiaError, PrivacyBudgetExceeded
from fesmia_hooks.probe import FeSMIA
from fesmia_hooks.report import LeakageReport
from fesmia_hooks.sequential import SequentialTest
from fesmia_hooks.sinks import HISTORY_FILE, JsonlSink, Sink, TensorBoardSink

__all__ = ["MonitorView", "PrivacyMonitor", "RankedMonitorView"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


class MonitorView:
    """Read-only stop state and history of a core monitor, for the objects that drive one.

    The framework integrations (and the plain-torch ``attach`` handle) mix this in and keep
    the core :class:`PrivacyMonitor` in ``self.monitor``.
    """

    monitor: PrivacyMonitor

    @property
    def history(self) -> list[LeakageReport]:
        """Every check's report, oldest first."""
        return self.monitor.history

    @property
    def last_report(self) -> LeakageReport | None:
        """The latest check's report, if any."""
        return self.monitor.last_report

    @property
    def should_stop(self) -> bool:
        """Whether the budget asked training to stop."""
        return self.monitor.should_stop

    @property
    def stop_reason(self) -> StopReason:
        """Which budget rule asked to stop (``StopReason.NOT_STOPPED`` if none did)."""
        return self.monitor.stop_reason

    @property
    def stop_message(self) -> str:
        """The budget's sentence about the stop, with the numbers; empty if none."""
        return self.monitor.stop_message

    @property
    def stopped_epoch(self) -> int | None:
        """The epoch (from 0) whose check asked to stop; ``None`` if none did."""
        return self.monitor.stopped_epoch


class RankedMonitorView(MonitorView):
    """A :class:`MonitorView` that also knows a stop decided, after reduction, on any rank.

    Integrations that reduce the stop decision across processes record the epoch of a
    reduced stop in ``_reduced_stop_epoch``; a stop is then reported on every rank.
    """

    _reduced_stop_epoch: int | None = None

    @property
    def should_stop(self) -> bool:
        """Whether the budget asked to stop, on this process or (reduced) on any."""
        return self.monitor.should_stop or self._reduced_stop_epoch is not None

    @property
    def stopped_epoch(self) -> int | None:
        """The epoch (from 0) whose check stopped training, or ``None``."""
        if self.monitor.stopped_epoch is not None:
            return self.monitor.stopped_epoch
        return self._reduced_stop_epoch


class PrivacyMonitor:
    """Run the probe on a cadence, log every check, and decide when leakage is too much.

    The monitor is framework-neutral: call :meth:`step` after each epoch (or optimizer step)
    of any training loop; the Lightning, Keras and plain-torch integrations do this for you.
    It never stops training itself: it sets :attr:`should_stop` (and raises with
    ``action="raise"``) and the loop acts on it.

    Significance is calibrated per *run*: the probe's label permutations are the same at
    every check, and :class:`~fesmia_hooks.sequential.SequentialTest` spends the budget's
    ``alpha`` over the checks, so a model that leaks nothing raises a false alarm in at most
    ``alpha`` of its training runs however many checks it makes.

    Args:
        canaries: The canary set.
        probe: The probe; ``FeSMIA()`` when omitted.
        budget: The leakage budget; ``None`` only measures and logs.
        log_dir: Folder for TensorBoard events and the ``privacy_history.jsonl`` history;
            ``None`` writes nothing.
        every_n_epochs: Check after every n-th epoch (epochs counted from 0, so the first
            check follows epoch ``n - 1``). ``None`` turns the epoch cadence off.
        every_n_steps: Check every n-th optimizer step instead.
        sinks: Extra sinks (anything with ``log(report, step)`` and ``close()``).
        tensorboard: Write TensorBoard events into ``log_dir``.
        restore_safe_weights: On a stop, load back the last weights that were within budget.
            They are kept as one copy of the model's ``state_dict`` on its own device, so
            this costs the model's size in device memory.
        on_error: ``"warn"`` records a failed check and carries on; ``"raise"`` re-raises.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        >>> canaries = CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:]))
        >>> monitor = PrivacyMonitor(canaries, probe=FeSMIA(episodes=20, permutations=99),
        ...                          budget=LeakageBudget(max_level="low"))
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(8, 3)
        >>> report = monitor.step(model, epoch=0)
        >>> report.level.value, monitor.should_stop
        ('none', False)
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
        sinks: Sequence[Sink] = (),
        tensorboard: bool = True,
        restore_safe_weights: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        if not isinstance(canaries, CanarySet):
            raise ConfigurationError(
                f"`canaries` must be a CanarySet, got {type(canaries).__name__}"
            )
        if probe is not None and not isinstance(probe, FeSMIA):
            raise ConfigurationError(f"`probe` must be a FeSMIA, got {type(probe).__name__}")
        if budget is not None and not isinstance(budget, LeakageBudget):
            raise ConfigurationError(
                f"`budget` must be a LeakageBudget or None, got {type(budget).__name__}"
            )
        self.every_n_steps = optional_positive_int("every_n_steps", every_n_steps)
        self.every_n_epochs = (
            None if self.every_n_steps is not None
            else optional_positive_int("every_n_epochs", every_n_epochs)
        )
        if self.every_n_epochs is None and self.every_n_steps is None:
            raise ConfigurationError(
                "give a cadence: `every_n_epochs` or `every_n_steps` (a positive int), got neither"
            )
        self.on_error = choice("on_error", on_error, ("warn", "raise"))
        optional_path("log_dir", log_dir)
        boolean("restore_safe_weights", restore_safe_weights)
        for sink in sinks:
            if not isinstance(sink, Sink):
                raise ConfigurationError(
                    f"each sink needs log(report, step) and close(), got {type(sink).__name__}"
                )
        self.canaries = canaries
        self.probe = probe if probe is not None else FeSMIA()
        self.probe.check_canaries(canaries)
        self.budget = budget
        self.sinks: list[Sink] = list(sinks)
        self.log_dir: Path | None = None
        self._history_sink: JsonlSink | None = None
        self._dir_sinks: list[Sink] = []
        self.set_log_dir(log_dir, tensorboard=tensorboard)
        self.restore_safe_weights = bool(restore_safe_weights)
        self._safe_state: dict[str, torch.Tensor] | None = None
        self._horizon: int | None = None
        self._reset_state()

    def set_log_dir(
        self,
        log_dir: str | os.PathLike[str] | None,
        *,
        tensorboard: bool = True,
        writer: Any = None,
        scalars: bool = True,
    ) -> None:
        """Point the history file and TensorBoard output at ``log_dir`` (``None``: no files).

        Integrations call this once they know where the framework writes (and, under
        several processes, only on rank zero). Sinks opened for an earlier ``log_dir`` are
        closed; sinks given to the constructor stay.

        Args:
            log_dir: Folder of ``privacy_history.jsonl`` (and of the event files when no
                ``writer`` is given).
            tensorboard: Write TensorBoard content.
            writer: An existing ``SummaryWriter`` to write TensorBoard content through.
            scalars: Write scalars to TensorBoard too (off when the framework's logger
                already writes them).
        """
        for sink in self._dir_sinks:
            self.sinks.remove(sink)
            sink.close()
        self._dir_sinks = []
        self._history_sink = None
        self.log_dir = None if log_dir is None else Path(log_dir)
        if self.log_dir is None:
            return
        self._history_sink = JsonlSink(self.log_dir / HISTORY_FILE)
        self._dir_sinks.append(self._history_sink)
        if tensorboard:
            self._dir_sinks.append(
                TensorBoardSink(None if writer is not None else self.log_dir, writer=writer,
                                scalars=scalars)
            )
        self.sinks.extend(self._dir_sinks)

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        alpha = self.budget.alpha if self.budget is not None else self.probe.alpha
        horizon = self.budget.horizon if self.budget is not None else None
        horizon = horizon if horizon is not None else self._horizon
        self._test = SequentialTest(alpha=alpha, horizon=horizon)
        self.history: list[LeakageReport] = []
        self.errors: list[dict[str, Any]] = []
        self.checks = 0
        self.streak = 0
        self.should_stop = False
        self.stop_reason = StopReason.NOT_STOPPED
        self.stop_message = ""
        self.stopped_epoch: int | None = None
        self.stopped_step: int | None = None
        self.last_decision: Decision | None = None
        self._checked: set[tuple[str, int]] = set()

    def reset(self, *, horizon: int | None = None) -> None:
        """Forget every check: a new training run starts (keeps configuration and sinks).

        Args:
            horizon: Checks expected in the new run (for example ``max_epochs //
                every_n_epochs``), when the budget did not fix it; spends ``alpha`` evenly.
        """
        self._horizon = optional_positive_int("horizon", horizon)
        self._reset_state()
        self._safe_state = None

    @property
    def last_report(self) -> LeakageReport | None:
        """The latest report, if any."""
        return self.history[-1] if self.history else None

    # ------------------------------------------------------------------ cadence
    def is_due(self, *, epoch: int | None = None, step: int | None = None) -> bool:
        """Whether a check is due at this epoch end (or this optimizer step)."""
        if self.every_n_steps is not None:
            return step is not None and step > 0 and step % self.every_n_steps == 0 and (
                ("step", step) not in self._checked
            )
        assert self.every_n_epochs is not None
        return epoch is not None and (epoch + 1) % self.every_n_epochs == 0 and (
            ("epoch", epoch) not in self._checked
        )

    def step(
        self, model: nn.Module, *, epoch: int | None = None, step: int | None = None
    ) -> LeakageReport | None:
        """Check ``model`` if a check is due; ``None`` otherwise (or if a check failed).

        Args:
            model: The model being trained (left exactly as it was).
            epoch: The epoch that just ended, counted from 0.
            step: The global optimizer step, for ``every_n_steps`` and for logging.
        """
        if not self.is_due(epoch=epoch, step=step):
            return None
        return self.check(model, epoch=epoch, step=step)

    def check(
        self, model: nn.Module, *, epoch: int | None = None, step: int | None = None
    ) -> LeakageReport | None:
        """Run one check now, log it, and apply the budget.

        Raises:
            PrivacyBudgetExceeded: When the budget is breached with ``action="raise"``.
        """
        if self.every_n_steps is not None and step is not None:
            self._checked.add(("step", step))
        elif epoch is not None:
            self._checked.add(("epoch", epoch))
        index = self.checks + 1
        try:
            raw = self.probe.evaluate(model, self.canaries, step=step, epoch=epoch, check=index)
        except Exception as exc:  # noqa: BLE001 - a failing check must not kill training
            self._record_error(exc, epoch=epoch, step=step, index=index)
            return None
        self.checks = index
        report = self._calibrate(raw)
        decision = self._decide(report)
        report = report.with_updates(
            breached=decision.breached,
            action=(self.budget.action if decision.breached and self.budget else "none"),
        )
        self.history.append(report)
        log.info("fesmia-hooks check %d: %s", index, report.summary())
        global_step = step if step is not None else (epoch if epoch is not None else index)
        for sink in self.sinks:
            sink.log(report, global_step)
        self._act(model, report, decision)
        return report

    def _calibrate(self, report: LeakageReport) -> LeakageReport:
        p_value, threshold, significant = self._test.update(
            report.relaxed, report.null_statistics
        )
        reading = report.strict if self.probe.bands.on == "strict" else report.relaxed
        return report.with_updates(
            p_value=p_value,
            p_threshold=threshold,
            significant=significant,
            level=self.probe.bands.classify(reading, significant=significant),
        )

    def _decide(self, report: LeakageReport) -> Decision:
        if self.budget is None:
            self.streak = 0
            decision = Decision(False, False, StopReason.NOT_STOPPED, "no budget")
        else:
            crossed = self.budget.crossing(report) is not None
            self.streak = self.streak + 1 if crossed else 0
            decision = self.budget.decide(report, checks=self.checks, streak=self.streak)
        self.last_decision = decision
        return decision

    def _act(self, model: nn.Module, report: LeakageReport, decision: Decision) -> None:
        if not decision.breached:
            if self.restore_safe_weights and self.streak == 0:
                self._safe_state = {
                    k: v.detach().clone() for k, v in model.state_dict().items()
                }
            return
        assert self.budget is not None
        log.warning("fesmia-hooks: %s", decision.message)
        for fn in self.budget.on_breach:
            fn(report, decision)
        if not decision.should_stop:
            return
        if not self.should_stop:
            self.stopped_epoch, self.stopped_step = report.epoch, report.step
        self.should_stop = True
        self.stop_reason = decision.reason
        self.stop_message = decision.message
        if self.restore_safe_weights:
            self.restore_weights(model)
        if self.budget.action == "raise":
            raise PrivacyBudgetExceeded(decision.message, report)

    def restore_weights(self, model: nn.Module) -> bool:
        """Load the last within-budget weights into ``model``; False if there are none."""
        if self._safe_state is None:
            warnings.warn(
                "restore_safe_weights: no check was within budget, weights left as they are",
                stacklevel=2,
            )
            return False
        model.load_state_dict(self._safe_state)
        return True

    def _record_error(
        self, exc: Exception, *, epoch: int | None, step: int | None, index: int
    ) -> None:
        if self.on_error == "raise" or isinstance(exc, PrivacyBudgetExceeded):
            raise exc
        kind = type(exc).__name__
        # Messages of fesmia-hooks errors never hold canary data; others are not trusted.
        text = str(exc) if isinstance(exc, FesmiaError) else "(message withheld)"
        record = {"check": index, "epoch": epoch, "step": step, "error": f"{kind}: {text}"}
        self.errors.append(record)
        if self._history_sink is not None:
            self._history_sink.write(record)
        warnings.warn(f"fesmia-hooks check failed and was skipped: {kind}: {text}", stacklevel=3)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain-value state: history, counters, the run-level test and the stop state."""
        return {
            "version": STATE_VERSION,
            "history": [r.as_dict() for r in self.history],
            "errors": list(self.errors),
            "checks": self.checks,
            "streak": self.streak,
            "sequential": self._test.state_dict(),
            "should_stop": self.should_stop,
            "stop_reason": self.stop_reason.value,
            "stop_message": self.stop_message,
            "stopped_epoch": self.stopped_epoch,
            "stopped_step": self.stopped_step,
            "checked": sorted([k, v] for k, v in self._checked),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; keys missing from older states get defaults."""
        self._reset_state()
        self.history = [LeakageReport.from_dict(d) for d in state.get("history", [])]
        self.errors = list(state.get("errors", []))
        self.checks = int(state.get("checks", len(self.history)))
        self.streak = int(state.get("streak", 0))
        self._test.load_state_dict(state.get("sequential", {}))
        self.should_stop = bool(state.get("should_stop", False))
        self.stop_reason = StopReason(state.get("stop_reason", StopReason.NOT_STOPPED.value))
        self.stop_message = str(state.get("stop_message", ""))
        self.stopped_epoch = state.get("stopped_epoch")
        self.stopped_step = state.get("stopped_step")
        self._checked = {(str(k), int(v)) for k, v in state.get("checked", [])}
        if self._history_sink is not None:
            # Checks made after this state was saved will be made again: drop their lines.
            self._history_sink.truncate_after(self.checks)

    def close(self) -> None:
        """Flush and close every sink."""
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> PrivacyMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
