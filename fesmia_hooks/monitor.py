"""PrivacyMonitor: periodic privacy checks, read for the run, logged, and held to a budget.

One check goes one way, touching each object once: the probe *measures*
(:class:`~fesmia_hooks.measurement.Measurement`), the run's
:class:`~fesmia_hooks.Calibration` *reads* it into a :class:`~fesmia_hooks.LeakageReport`
(p-value against the run-level threshold, level), the :class:`~fesmia_hooks.LeakageBudget`
*decides* (:class:`~fesmia_hooks.Decision`, counting its own streak), the sinks *record*,
and the monitor *acts* (stop flag, safe weights, ``on_breach``, raise).
"""

from __future__ import annotations

import atexit
import copy
import functools
import inspect
import json
import logging
import math
import os
import threading
import uuid
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fesmia_hooks._validation import (
    boolean,
    choice,
    optional_path,
    optional_positive_int,
    probability,
    writable_folder,
)
from fesmia_hooks.budget import Decision, LeakageBudget, StopReason
from fesmia_hooks.calibration import DEFAULT_STATISTIC, Calibration, alarm_components
from fesmia_hooks.canaries import Canaries
from fesmia_hooks.distributed import agree_across_ranks, is_distributed, rank_zero_value
from fesmia_hooks.dp import Accountant, accountant_epsilon, check_accountant, epsilon_readings
from fesmia_hooks.exceptions import (
    CanaryError,
    ConfigurationError,
    PrivacyBudgetExceeded,
    ProbeError,
    describe_error,
)
from fesmia_hooks.guard import model_device
from fesmia_hooks.probe import AUTO_PERMUTATIONS, FeSMIA, Probe
from fesmia_hooks.report import LeakageReport, LevelBands
from fesmia_hooks.sequences import withhold_words
from fesmia_hooks.sinks import Sink, sinks_for
from fesmia_hooks.worker import AttackWorker
from fesmia_hooks.writer import FLUSH_TIMEOUT_S, BackgroundWriter

__all__ = ["PREFLIGHT_ALPHA", "PrivacyMonitor"]

log = logging.getLogger(__name__)

STATE_VERSION = 2
#: Significance level of the pre-flight check (strict: a split is refused only on clear
#: evidence that its two sides differ).
PREFLIGHT_ALPHA = 0.002
#: The pre-flight check's statistic: the whole pool's centroid ranking, which sees the two
#: sides differ in any direction.
PREFLIGHT_STATISTIC = "centroid_auc+centroid_strict"
_NO_BUDGET = Decision(False, False, StopReason.NOT_STOPPED, "no budget")


class PrivacyMonitor:
    """Run the probe on a cadence, log every check, and decide when leakage is too much.

    The monitor is framework-neutral: call :meth:`step` after each epoch (or optimizer step)
    of any training loop; the Lightning, Keras, Hugging Face and plain-torch integrations do
    this for you. It never stops training itself: it sets :attr:`should_stop` (and raises
    with ``action="raise"``) and the loop acts on it.

    Significance is calibrated per *run*: the probe's label permutations are the same at
    every check, and the :class:`~fesmia_hooks.Calibration` spends ``alpha`` over the checks,
    so a model that leaks nothing raises a false alarm in at most ``alpha`` of its training
    runs however many checks it makes (``docs/science.md#run-level-test``).

    Args:
        canaries: The canary set (:class:`~fesmia_hooks.CanarySet` or
            :class:`~fesmia_hooks.SequenceCanarySet`). ``None`` defers it to
            :meth:`set_canaries` (an integration may take it from the trainer).
        probe: The probe; ``FeSMIA()`` when omitted. Anything with the methods of
            :class:`~fesmia_hooks.probe.Probe` will do.
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
        alpha: False-alarm rate allowed per training run when nothing leaks.
        horizon: Expected number of checks; ``alpha`` is spent over them (evenly when the
            probe's permutations allow one alarm per check, front-loaded on a log scale
            otherwise; see ``docs/science.md#run-level-test``). ``None`` lets an
            integration set it from the run's limits (or spends ``alpha`` as
            ``alpha * c / (c + 10)``).
        bands: Where the qualitative levels start (on the share beyond chance).
        statistic: The alarm statistic (see :func:`fesmia_hooks.calibration.alarm_statistic`);
            ``None``: the probe's ``default_statistic``
            (:data:`~fesmia_hooks.calibration.DEFAULT_STATISTIC` for a probe reading
            signals).
        preflight: What :meth:`preflight` does when the attack already tells members from
            non-members before training: ``"error"`` raises a
            :class:`~fesmia_hooks.CanaryError`, ``"warn"`` warns and goes on (later
            readings are then read against that baseline), ``"off"`` skips the check. The
            integrations run it when a run starts; in a loop of your own, call it before
            training.
        asynchronous: Run each check's attack on a worker thread while training goes on:
            a check forwards the canaries and copies their features to the host (on CUDA,
            the only wait on the device), then returns ``None``; its report, decision and
            outputs land at the monitor's next :meth:`step`, :meth:`check` or :meth:`land`
            (the integrations call :meth:`land` at the next epoch end, or the next step with
            ``every_n_steps``: the decision lands one epoch or step later), or at
            :meth:`flush` and :meth:`close`, which wait for it (a checkpoint does not: it
            names the check, and a run resumed from it runs the check again, see
            :meth:`resume_check`). With ``restore_safe_weights`` the
            weights the features came from are the ones kept. Framework logs (Lightning's
            metrics, Keras's ``History``) get a check's values when it lands; the history
            file and TensorBoard file them under the check's own epoch and step.
            Needs a probe whose attack runs no code of the user's (``FeSMIA`` with the
            default learner).
        accountant: A differential-privacy accountant read at every check into the
            report's ``epsilon_accountant`` (``privacy/epsilon_accountant``): an Opacus
            ``PrivacyEngine`` or accountant (anything with ``get_epsilon(delta)``), or a
            function ``fn(delta) -> float`` (one that finds the engine later, say).
        delta: The δ of both ε readings: the accountant's, and the one-run audit's lower
            bound ``epsilon_lower_bound``, which the monitor computes when the canaries
            were included by independent coins (:meth:`~fesmia_hooks.CanarySet.for_audit`;
            ``docs/science.md#dp-audit``).
        audit_confidence: Confidence of ``epsilon_lower_bound`` at each check. When the
            budget caps ``epsilon_lower_bound`` it acts on every check, so the bound is then
            computed at check ``k`` at confidence ``1 - (1 - audit_confidence) / (k (k + 1))``
            (these sum to ``1 - audit_confidence`` over any number of checks): a correct DP
            implementation is stopped in at most ``1 - audit_confidence`` of its runs. The
            report's ``epsilon_confidence`` says which applied.

    Example:
        >>> import torch
        >>> from fesmia_hooks import CanarySet, FeSMIA, LeakageBudget
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
        canaries: Canaries | None,
        *,
        probe: Probe | None = None,
        budget: LeakageBudget | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        sinks: Sequence[Sink] = (),
        tensorboard: bool = True,
        restore_safe_weights: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
        alpha: float = 0.05,
        horizon: int | None = None,
        bands: LevelBands | None = None,
        statistic: str | None = None,
        preflight: Literal["error", "warn", "off"] = "error",
        asynchronous: bool = False,
        accountant: Accountant | None = None,
        delta: float = 1e-5,
        audit_confidence: float = 0.95,
    ) -> None:
        if probe is not None and not isinstance(probe, Probe):
            raise ConfigurationError(
                "`probe` must be a FeSMIA (or have check_canaries, measure and settings), "
                f"got {type(probe).__name__}"
            )
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
        self.tensorboard = boolean("tensorboard", tensorboard)
        boolean("restore_safe_weights", restore_safe_weights)
        if isinstance(sinks, Sink) or isinstance(sinks, (str, bytes)):
            raise ConfigurationError(
                f"`sinks` must be a sequence of sinks, got a single {type(sinks).__name__}"
            )
        for sink in sinks:
            if not isinstance(sink, Sink):
                raise ConfigurationError(
                    f"each sink needs log(report, step) and close(), got {type(sink).__name__}"
                )
        self.preflight_mode = choice("preflight", preflight, ("error", "warn", "off"))
        check_accountant(accountant)
        self.accountant = accountant
        self._accountant_warned: set[str] = set()
        self.delta = probability("delta", delta, open_low=False)
        self.audit_confidence = probability("audit_confidence", audit_confidence)
        self.probe: Probe = probe if probe is not None else FeSMIA()
        self.asynchronous = boolean("asynchronous", asynchronous)
        if self.asynchronous and not getattr(self.probe, "runs_off_thread", False):
            raise ConfigurationError(
                "asynchronous=True needs a probe whose attack can run beside training "
                "(FeSMIA with the default learner, method='simpleshot'); got "
                f"{self.probe!r}: leave asynchronous=False for this probe"
            )
        self._worker = AttackWorker()
        self._pending: _Pending | None = None
        self._land_lock = threading.RLock()
        if statistic is None:
            statistic = getattr(self.probe, "default_statistic", DEFAULT_STATISTIC)
        self.calibration = Calibration(alpha, horizon=horizon, bands=bands, statistic=statistic)
        self.budget = budget
        if budget is not None and "epsilon_accountant" in budget.max_values and (
            accountant is None
        ):
            raise ConfigurationError(
                "the budget caps epsilon_accountant, which needs an `accountant` (an Opacus "
                "PrivacyEngine, say); got accountant=None"
            )
        self.canaries: Canaries | None = None
        if canaries is not None:
            self.set_canaries(canaries)
        self.sinks: list[Sink] = list(sinks)
        self._writer = BackgroundWriter()
        #: Whether this process writes to the sinks: under ``torch.distributed``, rank zero
        #: only (integrations set it from their framework's rank).
        self.writes = not is_distributed() or torch.distributed.get_rank() == 0
        self.log_dir: Path | None = None
        self._dir_sinks: list[Sink] = []
        self.set_log_dir(log_dir, tensorboard=tensorboard)
        self.restore_safe_weights = bool(restore_safe_weights)
        self._safe_state: dict[str, Any] | None = None
        #: The pre-flight check's report (before training), if one was made this run.
        self.baseline: LeakageReport | None = None
        self._reset_state()
        self._size_permutations()

    # ------------------------------------------------------------------ configuration
    def set_canaries(self, canaries: Canaries) -> None:
        """Give the monitor its canary set (checked against the probe's needs)."""
        if not isinstance(canaries, Canaries):
            raise ConfigurationError(
                "`canaries` must be a CanarySet or SequenceCanarySet, "
                f"got {type(canaries).__name__}"
            )
        self.probe.check_canaries(canaries)
        if self.budget is not None and "epsilon_lower_bound" in self.budget.max_values:
            if not canaries.random_inclusion:
                raise ConfigurationError(
                    "the budget caps epsilon_lower_bound, which needs canaries included by "
                    "independent coins (CanarySet.for_audit, or random_inclusion=True); got "
                    "canaries without random_inclusion"
                )
            if getattr(self.probe, "features", None) not in ("signals", "both"):
                raise ConfigurationError(
                    "the budget caps epsilon_lower_bound, which is computed from the probe's "
                    "signals: use a FeSMIA probe with features='signals' or 'both', got "
                    f"{self.probe!r}"
                )
        self._land()  # a check still running reads the canaries it was taken on
        self.canaries = canaries

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
        closed; sinks given to the constructor stay. The sinks come from
        :func:`~fesmia_hooks.sinks.sinks_for`.

        Raises:
            ConfigurationError: When ``log_dir`` is a file or cannot be created.

        Args:
            log_dir: Folder of ``privacy_history.jsonl`` (and of the event files when no
                ``writer`` is given). It need not exist yet, but must be creatable.
            tensorboard: Write TensorBoard content.
            writer: An existing ``SummaryWriter`` to write TensorBoard content through.
            scalars: Write scalars to TensorBoard too (off when the framework's logger
                already writes them).
        """
        folder = None if log_dir is None else writable_folder("log_dir", log_dir)
        for sink in self._dir_sinks:
            self.sinks.remove(sink)
            self._call([sink], "close")
            self._writer.retire(sink)  # its writing thread ends with it
        self._dir_sinks = []
        self.log_dir = folder
        self._dir_sinks = sinks_for(self.log_dir, tensorboard=tensorboard, writer=writer,
                                    scalars=scalars)
        self.sinks.extend(self._dir_sinks)
        if getattr(self, "_resumed", False):
            self._resume(self._dir_sinks)
        elif getattr(self, "_header_sent", False):
            self._call(self._dir_sinks, "start_run", self.header())

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.run_id = uuid.uuid4().hex[:16]
        self.history: list[LeakageReport] = []
        self.errors: list[dict[str, Any]] = []
        self.checks = 0
        self.should_stop = False
        self.stop_reason = StopReason.NOT_STOPPED
        self.stop_message = ""
        self.stopped_epoch: int | None = None
        self.stopped_step: int | None = None
        self.last_decision: Decision | None = None
        self._checked: set[tuple[str, int]] = set()
        self._told_new_loop = False
        #: ``(mark, epoch, step)`` of a check running when the loaded state was saved.
        self._rerun: tuple[tuple[str, int], int | None, int | None] | None = None
        #: What went wrong writing outputs (sinks, on_breach callbacks) in this run.
        self.output_errors: list[str] = []
        self._ranks_agree = False
        self._header_sent = False
        self._resumed = False
        #: A state was loaded and no run has begun since: the next run continues it.
        self.restored = False
        if self.budget is not None:
            self.budget.reset()

    def reset(self, *, horizon: int | None = None) -> None:
        """Forget every check: a new training run starts (keeps configuration and sinks).

        Args:
            horizon: Checks expected in the new run (for example ``max_epochs //
                every_n_epochs``), unless a horizon was fixed at construction.
        """
        # A check a failed fit left running is recorded in the history of its run; nothing
        # acts on it any more (no stop, no weights restored): training has moved on.
        self._land(act=False)
        self.calibration.reset(horizon=horizon)
        self._reset_state()
        self._safe_state = None
        self.baseline = None
        self._size_permutations()
        start_run = getattr(self.probe, "start_run", None)
        if callable(start_run):
            start_run()

    def _size_permutations(self) -> None:
        """Size the probe for the run: the statistics and permutations its test needs.

        Only the statistics the alarm reads are computed under the null; a
        ``permutations="auto"`` probe gets as many permutations as the run's horizon needs.
        """
        use_statistics = getattr(self.probe, "use_statistics", None)
        if callable(use_statistics):
            use_statistics(alarm_components(self.calibration.statistic))
        if not getattr(self.probe, "auto_permutations", False):
            return
        low, high = AUTO_PERMUTATIONS
        needed = self.calibration.permutations_needed() or low
        self.probe.set_permutations(max(low, min(high, needed)))  # type: ignore[attr-defined]

    @functools.cached_property
    def _takes_statistics(self) -> bool:
        """Whether the probe's ``measure`` takes the statistics to compute (FeSMIA's does)."""
        try:
            params = inspect.signature(self.probe.measure).parameters
        except (TypeError, ValueError):
            return False
        return "statistics" in params

    def _statistics_of(self, statistic: str) -> dict[str, Any]:
        """``measure``'s keyword for the statistics ``statistic`` reads (none if it takes none).

        Passed with every check, so that a probe shared with another monitor, or switched
        by a pre-flight check, computes what this monitor's test reads.
        """
        if not self._takes_statistics:
            return {}
        return {"statistics": alarm_components(statistic)}

    def preflight(self, model: nn.Module) -> LeakageReport | None:
        """Check, before training, that members and non-members cannot be told apart yet.

        Under a random split of one data set, an untrained (or not yet fine-tuned) model
        cannot tell the canary members from the non-members: every later reading assumes so
        (``docs/science.md#exchangeability``). If the attack already separates them at a
        strict level (p <= :data:`PREFLIGHT_ALPHA`, on :data:`PREFLIGHT_STATISTIC`, which
        looks in every direction), the split is not exchangeable and later
        readings would measure the split, not memorisation. The report is kept as
        :attr:`baseline` and in the history's header; it is not a check of the run.

        Returns:
            The pre-flight report, or ``None`` with ``preflight="off"``, or with
            ``preflight="warn"`` when the check itself failed (recorded as usual).

        Raises:
            CanaryError: With ``preflight="error"``, when the attack separates the sides.
            ProbeError: With ``preflight="error"``, when the check cannot run at all (the
                model refuses the canaries): every check of the run would fail alike.
        """
        if self.preflight_mode == "off":
            return None
        if self.canaries is None:
            raise ConfigurationError(
                "the monitor has no canaries: pass `canaries` or call set_canaries() first"
            )
        self._agree_across_ranks(model)  # before the first collective of the run
        # A difference in any direction breaks exchangeability: the test is two-sided (the
        # pool's centroid ranking), where the alarm's default may look one way only.
        statistic = PREFLIGHT_STATISTIC if self._takes_statistics else self.calibration.statistic
        try:
            measured = self.probe.measure(model, self.canaries, **self._statistics_of(statistic))
        except Exception as exc:  # noqa: BLE001 - every check would fail alike: say so now
            if self.preflight_mode == "error" and not isinstance(exc, PrivacyBudgetExceeded):
                raise ProbeError(
                    "the pre-flight check could not run the model on the canaries, and every "
                    f"check would fail the same way: {self._describe(exc)} (pass "
                    "preflight='warn' to train on unmonitored)"
                ) from None
            self._record_error(exc, epoch=None, step=None, index=0)
            return None
        report = Calibration(PREFLIGHT_ALPHA, bands=self.calibration.bands,
                             statistic=statistic).single_check(measured)
        self.baseline = report
        if not report.significant:
            return report
        message = (
            f"before training, the attack already tells the canary members from the "
            f"non-members (p = {report.p_value:.3g} <= {PREFLIGHT_ALPHA}; AUC {report.auc:.2f}, "
            f"strict Log-MIA {report.strict:.2f} against chance {report.chance_strict:.2f}): "
            "the split is not exchangeable, so later readings would measure it rather than "
            "memorisation. Likely causes: members and non-members drawn from different "
            "sources, periods or blocks of a sorted data set; duplicates of members among "
            "the non-members' neighbours; a model already trained on the members. Draw both "
            "sides at random from one pool (CanarySet.split), or pass preflight='warn' to go "
            "on and read later checks against this baseline"
        )
        if self.preflight_mode == "error":
            raise CanaryError(message)
        warnings.warn(f"fesmia-hooks: {message}", stacklevel=2)
        return report

    @property
    def streak(self) -> int:
        """Consecutive checks that crossed the budget (0 without a budget)."""
        return 0 if self.budget is None else self.budget.streak

    @property
    def last_report(self) -> LeakageReport | None:
        """The latest report, if any."""
        return self.history[-1] if self.history else None

    def header(self) -> dict[str, Any]:
        """The run's id and the settings that interpret it (the history's first line)."""
        canaries = None
        if self.canaries is not None:
            canaries = {
                "kind": self.canaries.kind,
                "members": self.canaries.num_members,
                "non_members": self.canaries.num_non_members,
                "fingerprint": self.canaries.fingerprint(),
                "random_inclusion": self.canaries.random_inclusion,
            }
        baseline = None
        if self.baseline is not None:
            b = self.baseline
            baseline = {"p_value": b.p_value, "significant": b.significant, "auc": b.auc,
                        "log_mia_strict": b.strict, "log_mia_relaxed": b.relaxed,
                        "share_beyond_chance": b.share_beyond_chance}
        return {
            "run_id": self.run_id,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "baseline": baseline,
            "settings": {
                "probe": self.probe.settings(),
                "calibration": self.calibration.settings(),
                "budget": None if self.budget is None else self.budget.settings(),
                "canaries": canaries,
                "dp": {"delta": self.delta, "audit_confidence": self.audit_confidence,
                       "accountant": None if self.accountant is None
                       else type(self.accountant).__name__},
                "cadence": {"every_n_epochs": self.every_n_epochs,
                            "every_n_steps": self.every_n_steps},
            },
        }

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
        if epoch is None and step is None:
            raise ConfigurationError(
                "step() needs the epoch that just ended (epoch=, from 0), or the optimizer "
                "step (step=) with every_n_steps: without either no check is ever due"
            )
        mark = ("step", step) if self.every_n_steps is not None else ("epoch", epoch)
        # a checked mark again, with later ones checked too: the count went back (a set
        # lookup first: the scan runs only when a mark repeats)
        if mark in self._checked and not self._told_new_loop and any(
                kind == mark[0] and value > mark[1] for kind, value in self._checked):
            self._told_new_loop = True
            warnings.warn(
                f"fesmia-hooks: {mark[0]} {mark[1]} was already checked in this run, so no "
                "check is made there again; a new training loop (another fold, a sweep) is a "
                "new run: call monitor.reset() before it, or use a new monitor",
                stacklevel=2,
            )
        landed = self._land()
        if landed is not None and landed.breached and self.should_stop:
            return landed  # the stop landed now: the loop ends here, no new check starts
        if not self.is_due(epoch=epoch, step=step):
            return landed
        return self.check(model, epoch=epoch, step=step) or landed

    def check(
        self, model: nn.Module, *, epoch: int | None = None, step: int | None = None
    ) -> LeakageReport | None:
        """Run one check now: measure, calibrate, decide, record, act.

        Raises:
            ConfigurationError: When the monitor has no canaries yet.
            PrivacyBudgetExceeded: When the budget is breached with ``action="raise"``.
        """
        if self.canaries is None:
            raise ConfigurationError(
                "the monitor has no canaries: pass `canaries` or call set_canaries() first"
            )
        mark = (("step", step) if self.every_n_steps is not None and step is not None
                else ("epoch", epoch) if epoch is not None else None)
        landed = self._land()
        if landed is not None and landed.breached and self.should_stop:
            return landed  # the stop landed now: the loop ends here, no new check starts
        index = self.checks + 1
        self._agree_across_ranks(model)  # a configuration error: raised on every rank
        accounted = accountant_epsilon(self.accountant, self.delta,  # ε of these weights
                                       warned=self._accountant_warned)
        if self.accountant is not None:  # one decision for all ranks (no collective without)
            accounted = rank_zero_value(accounted, model_device(model))
        try:
            wanted = self._statistics_of(self.calibration.statistic)
            if self.asynchronous:
                attack = self.probe.prepare(  # type: ignore[attr-defined]
                    model, self.canaries, **wanted)
            else:
                measured = self.probe.measure(model, self.canaries, **wanted)
        except Exception as exc:  # noqa: BLE001 - a failing check must not kill training
            if mark is not None:
                self._checked.add(mark)  # a failed check is done: the next one moves on
            self._record_error(exc, epoch=epoch, step=step, index=index)
            return landed
        # An interrupted check (KeyboardInterrupt, SystemExit) is not marked: a retry runs it.
        new_mark = mark is not None and mark not in self._checked
        if mark is not None:
            self._checked.add(mark)
        if self.asynchronous:
            snapshot = _copy_state(model) if self.restore_safe_weights else None
            self._pending = _Pending(self._worker.submit(attack), model, index, epoch, step,
                                     snapshot, mark, new_mark, accounted, _versions(model))
            _LIVE.add(self)
            return landed
        return self._conclude(model, measured, index=index, epoch=epoch, step=step,
                              accounted=accounted)

    def resume_check(self, model: nn.Module) -> LeakageReport | None:
        """Run the check that was still running when the loaded state was saved.

        A checkpoint saved just after an asynchronous check started holds the weights that
        check read, not its result: a run resumed from it calls this on the restored model
        before training goes on (the integrations do), so that the check, and a stop it
        decides, are not lost. Its report (``None`` when there is no such check, or with
        ``asynchronous=True``: it then lands like any other check).

        Example:
            >>> import fesmia_hooks as fh
            >>> fh.PrivacyMonitor(None).resume_check(None) is None  # no state loaded
            True
        """
        rerun = self._rerun
        if rerun is None or rerun[0] in self._checked:
            self._rerun = None
            return None
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"resume_check needs the restored model (a torch.nn.Module), got "
                f"{type(model).__name__}"
            )
        _, epoch, step = rerun
        report = self.check(model, epoch=epoch, step=step)  # may raise: then it stays due
        self._rerun = None
        return report

    def land(self, *, act: bool = True) -> LeakageReport | None:
        """Conclude a pending asynchronous check now, waiting for its attack if it runs still.

        Its report, or ``None`` when no check was pending (or it failed). The framework
        adapters call it at the epoch end or step after the check started, so that its
        decision lands there; :meth:`step`, :meth:`check`, :meth:`flush` and :meth:`close`
        land it too (:meth:`state_dict` does not wait for it).

        Args:
            act: Act on the decision (stop, restore weights, raise, ``on_breach``). False
                records the check (or its failure) in the history and the outputs only,
                raising nothing: the run it belongs to has ended (a new run begins, or
                training failed).

        Raises:
            PrivacyBudgetExceeded: When the check breaches with ``action="raise"`` and
                ``act`` is true.

        Example:
            >>> import fesmia_hooks as fh
            >>> fh.PrivacyMonitor(None, asynchronous=True).land() is None  # nothing pending
            True
        """
        return self._land(act=act)

    def _land(self, *, act: bool = True) -> LeakageReport | None:
        """Wait for the attack of an asynchronous check, then read, decide and record it.

        An interrupt (``KeyboardInterrupt``) while waiting leaves the check pending: the next
        step, check, flush or close lands it. Two threads landing at once (a ``flush`` from
        another thread) conclude the check once. An interrupt raised by the attack itself
        (``SystemExit`` in a user's ``signal_fn``) is raised once, and the check dropped.
        """
        with self._land_lock:
            pending = self._pending
            if pending is None:
                return None
            try:
                measured = pending.future.result()
            except Exception as exc:  # noqa: BLE001 - a failing check must not kill training
                self._pending = None
                self._record_error(exc, epoch=pending.epoch, step=pending.step,
                                   index=pending.index, raising=act)
                return None
            except BaseException:
                if _raised_by(pending.future):  # the attack's own, not an interrupt of the wait
                    self._pending = None
                raise
            self._pending = None
            return self._conclude(pending.model, measured, index=pending.index,
                                  epoch=pending.epoch, step=pending.step,
                                  snapshot=pending.snapshot, accounted=pending.accounted,
                                  act=act)

    def _drop_pending(self, why: str) -> None:
        """Forget an asynchronous check without concluding it (its epoch or step may run again)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.future.cancel()
        if pending.new_mark:
            self._checked.discard(pending.mark)
        warnings.warn(f"fesmia-hooks: the asynchronous check {pending.index} was not concluded: "
                      f"{why}", stacklevel=3)

    def _settled_marks(self) -> set[tuple[str, int]]:
        """The epochs and steps checked, less that of a check still running."""
        pending = self._pending
        if pending is None or not pending.new_mark:
            return set(self._checked)
        return self._checked - {pending.mark}

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickle, deepcopy) does not carry a check still running: it runs it again.
        state = dict(self.__dict__)
        state["_pending"] = None
        state["_checked"] = self._settled_marks()
        del state["_land_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._land_lock = threading.RLock()

    def _conclude(
        self,
        model: nn.Module,
        measured: Any,
        *,
        index: int,
        epoch: int | None,
        step: int | None,
        snapshot: dict[str, Any] | None = None,
        accounted: float = math.nan,
        act: bool = True,
    ) -> LeakageReport:
        """Calibrate, decide, record and (unless ``act`` is false) act on one measured check."""
        self.checks = index
        report = self.calibration.report(measured, check=index, epoch=epoch, step=step)
        report = report.with_updates(**epsilon_readings(
            getattr(measured, "audit_scores", np.empty(0)), self.canaries, delta=self.delta,
            confidence=self._bound_confidence(index), accountant=accounted))
        decision = self.budget.update(report) if self.budget is not None else _NO_BUDGET
        self.last_decision = decision
        if decision.breached:
            assert self.budget is not None
            report = report.with_updates(breached=True, action=self.budget.action)
        self.history.append(report)
        log.info("fesmia-hooks check %d: %s", index, report.summary())
        global_step = step if step is not None else (epoch if epoch is not None else index)
        self._start_run()
        self._call(self._writing(), "log", report, global_step)
        if act:
            self._act(model, report, decision, snapshot=snapshot)
        return report

    def _bound_confidence(self, index: int) -> float:
        """Confidence of check ``index``'s ε lower bound (see ``audit_confidence``)."""
        if self.budget is None or "epsilon_lower_bound" not in self.budget.max_values:
            return self.audit_confidence
        return 1.0 - (1.0 - self.audit_confidence) / (index * (index + 1))

    def _writing(self) -> list[Sink]:
        return self.sinks if self.writes else []

    def _start_run(self) -> None:
        if not self._header_sent:
            self._header_sent = True
            self._call(self._writing(), "start_run", self.header())

    def _call(self, sinks: Sequence[Sink], hook: str, *args: Any) -> None:
        """Call ``hook`` on every sink that has it; a failing sink is reported, not fatal.

        Outputs are secondary: a full disk or a broken writer must not lose the check's
        decision, which is made and acted on whatever the sinks do. Each check's outputs to
        the monitor's own sinks (those of ``log_dir``) are written by its background writer
        (:mod:`fesmia_hooks.writer`); the rare hooks (a run's start, a resume, a failed
        check, closing) wait for it and run here, in order, as do sinks given to the
        constructor.
        """
        background = hook == "log"
        if not background:  # run starts, resumes, failures, closes: in order, and now
            self._writer.flush()
        self._report_output_failures()
        for sink in sinks:
            method = getattr(sink, hook, None)
            if not callable(method):
                continue
            if background and any(sink is own for own in self._dir_sinks):
                self._writer.submit(sink, hook, args)
                continue
            try:
                method(*args)
            except Exception as exc:  # noqa: BLE001 - reported below, decisions go on
                self._output_failed(sink, hook, exc)

    def flush(self) -> None:
        """Wait until every queued output is written (a failing one is reported).

        The monitor flushes by itself before a stop returns, before :meth:`state_dict` and
        on :meth:`close`; call it before reading the history file of a running monitor.
        An asynchronous check still running is waited for and concluded first.
        """
        self._land()
        self._flush_outputs()

    def _flush_outputs(self) -> None:
        """Wait for the background writer (a failing or stuck write is reported)."""
        if not self._writer.flush():
            message = ("fesmia-hooks: the outputs of earlier checks were still being written "
                       f"after {FLUSH_TIMEOUT_S:.0f} s; they may be missing from log_dir")
            self.output_errors.append(message)
            warnings.warn(message, stacklevel=3)
        self._report_output_failures()

    def _report_output_failures(self) -> None:
        for sink, hook, exc in self._writer.failures():
            self._output_failed(sink, hook, exc)

    def _output_failed(self, sink: Any, hook: str, exc: BaseException) -> None:
        message = (f"fesmia-hooks: {type(sink).__name__}.{hook} failed and its output "
                   f"was skipped: {describe_error(exc)}")
        self.output_errors.append(message)
        warnings.warn(message, stacklevel=4)

    def _agree_across_ranks(self, model: nn.Module) -> None:
        """Under several processes, check once per run that every rank probes alike."""
        if self._ranks_agree or not is_distributed():
            return
        assert self.canaries is not None
        agree_across_ranks(
            "canary set and probe settings",
            json.dumps([self.canaries.fingerprint(), self.probe.settings(),
                        self.canaries.random_inclusion, self.delta, self.audit_confidence,
                        self.accountant is not None], sort_keys=True, default=str),
            model_device(model),
        )
        self._ranks_agree = True

    def _act(
        self,
        model: nn.Module,
        report: LeakageReport,
        decision: Decision,
        *,
        snapshot: dict[str, Any] | None = None,
    ) -> None:
        if not decision.breached:
            if self.restore_safe_weights and self.streak == 0:
                self._safe_state = snapshot if snapshot is not None else _copy_state(model)
            return
        assert self.budget is not None
        log.warning("fesmia-hooks: %s", decision.message)
        if decision.should_stop:  # the decision first: nothing below can lose it
            if not self.should_stop:
                self.stopped_epoch, self.stopped_step = report.epoch, report.step
            self.should_stop = True
            self.stop_reason = decision.reason
            self.stop_message = decision.message
            if self.restore_safe_weights:
                self.restore_weights(model)
            self.flush()  # the stop's line is on disk before training ends
        for fn in self.budget.on_breach:
            try:
                fn(report, decision)
            except Exception as exc:  # noqa: BLE001 - the user's callback; reported
                message = (f"fesmia-hooks: the on_breach callback {_name(fn)} failed: "
                           f"{describe_error(exc)}")
                self.output_errors.append(message)
                warnings.warn(message, stacklevel=3)
        if decision.should_stop and self.budget.action == "raise":
            raise PrivacyBudgetExceeded(decision.message, report)

    def restore_weights(self, model: nn.Module) -> bool:
        """Load the last within-budget weights into ``model``; False if there are none."""
        if self._safe_state is None:
            warnings.warn(
                "restore_safe_weights: no check was within budget, weights left as they are",
                stacklevel=2,
            )
            return False
        model.load_state_dict(_copy_values(self._safe_state))  # the safe copy stays safe
        return True

    def _describe(self, exc: BaseException, *, with_kind: bool = True) -> str:
        """:func:`describe_error`, with the words of text canaries withheld as well."""
        words = getattr(self.canaries, "private_words", frozenset())
        return withhold_words(describe_error(exc, with_kind=with_kind), words)

    def _record_error(
        self, exc: Exception, *, epoch: int | None, step: int | None, index: int,
        raising: bool = True,
    ) -> None:
        """Record a failed check; raise it with ``on_error="raise"``.

        Not ``raising``: the check of a run that has ended is recorded only.
        """
        if raising and (self.on_error == "raise" or isinstance(exc, PrivacyBudgetExceeded)):
            raise exc
        kind = type(exc).__name__
        text = self._describe(exc, with_kind=False)
        record = {"check": index, "epoch": epoch, "step": step, "error": f"{kind}: {text}"}
        self.errors.append(record)
        self._start_run()
        self._call(self._writing(), "log_failure", record)
        # where it happened: each failure is its own warning (Python shows a repeated one once)
        at = ("before training" if epoch is None and step is None
              else f"at step {step}" if step is not None else f"at epoch {epoch}")
        warnings.warn(f"fesmia-hooks check failed {at} and was skipped: {kind}: {text}",
                      stacklevel=3)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain-value state: the run, its history, counters, calibration and stop state.

        Queued outputs are written first, so the history file holds every check the state
        knows of. An asynchronous check still running is not waited for (training goes on,
        and this run concludes it as usual). While the model still holds the weights that
        check read (no optimizer step since: a checkpoint saved at the same epoch end or
        step), the state names it (``"running"``), and a run resumed from the state runs
        it again on those restored weights before training continues
        (:meth:`resume_check`), so that neither the check nor its stop is lost. A state
        saved after training moved on cannot hold it (its weights are gone): this run
        concludes it, a run resumed from the state goes on without it.
        """
        self._flush_outputs()
        pending = self._pending
        running = None
        if (pending is not None and pending.new_mark and pending.mark is not None
                and _versions(pending.model) == pending.versions):
            running = {"mark": list(pending.mark), "epoch": pending.epoch,
                       "step": pending.step}
        return {
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "history": [r.as_dict() for r in self.history],
            "errors": list(self.errors),
            "checks": self.checks,
            "calibration": self.calibration.state_dict(),
            "budget": None if self.budget is None else self.budget.state_dict(),
            "should_stop": self.should_stop,
            "stop_reason": self.stop_reason.value,
            "stop_message": self.stop_message,
            "stopped_epoch": self.stopped_epoch,
            "stopped_step": self.stopped_step,
            "checked": sorted([k, v] for k, v in self._settled_marks()),
            "running": running,
            "probe": self.probe.settings(),
            "canaries": None if self.canaries is None else self.canaries.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output and continue that run.

        Keys missing from older states get defaults. The history file keeps every line of
        other runs, and of this run up to the saved check (see
        :meth:`~fesmia_hooks.JsonlSink.resume`).
        """
        self._validate_state(state)
        try:  # read everything first: a refused state changes nothing
            history = [LeakageReport.from_dict(d) for d in state.get("history", [])]
            errors = [dict(e) for e in state.get("errors", [])]
            checks = int(state.get("checks", len(history)))
            calibration = state.get("calibration")
            if calibration is None:  # version 1 kept the run-level test at the top level
                calibration = {"horizon": self.calibration.horizon,
                               "sequential": state.get("sequential", {})}
            counters = state.get("budget") or {"checks": checks,
                                               "streak": state.get("streak", 0)}
            stop_reason = StopReason(state.get("stop_reason", StopReason.NOT_STOPPED.value))
            checked = {(str(k), int(v)) for k, v in state.get("checked", [])}
            rerun = _running_check(state.get("running"))
            trial = Calibration(self.calibration.alpha, horizon=self.calibration.fixed_horizon,
                                bands=self.calibration.bands,
                                statistic=self.calibration.statistic)
            trial.load_state_dict(calibration)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError,
                OverflowError) as exc:
            raise ConfigurationError(
                f"not a monitor's state: {type(exc).__name__} while reading it "
                f"({describe_error(exc)})"
            ) from None
        self._drop_pending("a saved state was loaded over the run it belonged to")
        self._reset_state()
        self.run_id = str(state.get("run_id") or self.run_id)
        self.history, self.errors, self.checks = history, errors, checks
        saved = _saved_permutations(state)
        if saved and saved != getattr(self.probe, "permutations", saved):
            self.probe.set_permutations(saved)  # type: ignore[attr-defined]
        self.calibration = trial
        if self.budget is not None:
            self.budget.load_state_dict(counters)
        self.should_stop = bool(state.get("should_stop", False))
        self.stop_reason = stop_reason
        self.stop_message = str(state.get("stop_message", ""))
        self.stopped_epoch = state.get("stopped_epoch")
        self.stopped_step = state.get("stopped_step")
        self._checked = checked
        self._rerun = rerun if rerun is not None and rerun[0] not in checked else None
        start_run = getattr(self.probe, "start_run", None)
        if callable(start_run):  # trajectories restart: earlier checks' features are not saved
            start_run()
        self._resumed = True
        self._header_sent = True
        self.restored = True
        self._resume(self.sinks)

    def _validate_state(self, state: Any) -> None:
        """Refuse, before touching anything, a state that is not this monitor's."""
        if not isinstance(state, dict):
            raise ConfigurationError(
                f"a monitor's state must be a dict from state_dict(), got {type(state).__name__}"
            )
        version = state.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or not (
            1 <= version <= STATE_VERSION
        ):
            raise ConfigurationError(
                f"not a monitor's state (version {version!r}; this fesmia-hooks reads versions "
                f"1 to {STATE_VERSION})"
            )
        unknown = sorted(set(state) - _STATE_KEYS)
        if unknown:
            raise ConfigurationError(
                f"not a monitor's state: unknown keys {unknown} (known: {sorted(_STATE_KEYS)})"
            )
        for key, kind in (("history", list), ("errors", list), ("checked", list)):
            if key in state and not isinstance(state[key], kind):
                raise ConfigurationError(
                    f"the state's {key!r} must be a list, got {type(state[key]).__name__}"
                )
        saved = state.get("probe")
        if isinstance(saved, dict):
            mine = self.probe.settings()
            differ = sorted(k for k in ("method", "shots", "queries", "episodes", "features",
                                        "signals", "signal_fn", "seed", "trajectory")
                            if k in saved and k in mine and saved[k] != mine[k])
            if differ:
                raise ConfigurationError(
                    f"the saved run's probe differs in {differ}: its run-level test cannot "
                    "continue with another probe; build the monitor with the run's probe"
                )
        calibration = state.get("calibration")
        if isinstance(calibration, dict):
            mine = self.calibration.settings()
            differ = sorted(k for k in ("alpha", "statistic")
                            if k in calibration and calibration[k] != mine[k])
            if differ:
                saved_as = ", ".join(f"{k}={calibration[k]!r}" for k in differ)
                mine_as = ", ".join(f"{k}={mine[k]!r}" for k in differ)
                raise ConfigurationError(
                    f"the saved run was calibrated with {saved_as}, this monitor with "
                    f"{mine_as}: its run-level test cannot continue under other settings; "
                    f"build the monitor with {saved_as} to go on with that run"
                )
        saved = _saved_permutations(state)
        current = int(getattr(self.probe, "permutations", saved) or saved)
        if saved and saved != current and not getattr(self.probe, "auto_permutations", False):
            raise ConfigurationError(
                f"the saved run was tested with {saved} label permutations but this "
                f"monitor's probe draws {current}: the run-level test cannot continue "
                f"across them; build the probe with permutations={saved} (or 'auto')"
            )
        fingerprint = state.get("canaries")
        if fingerprint is not None and self.canaries is not None and (
            fingerprint != self.canaries.fingerprint()
        ):
            raise ConfigurationError(
                "the saved run watched another canary set (its fingerprint differs): a run "
                "cannot continue on other canaries; give the monitor the run's canaries"
            )

    def _resume(self, sinks: Sequence[Sink]) -> None:
        if not self.writes:
            return
        self._call(sinks, "resume", self.run_id, self.checks, list(self.errors), self.header())

    def close(self) -> None:
        """Conclude a pending asynchronous check, then flush and close every sink.

        Only the sinks this process writes to; a failing one is reported. The sinks close
        even when concluding the check raises (a breach with ``action="raise"``).
        """
        try:
            self._land()
        finally:
            self._call(self._writing(), "close")
            self.flush()
            self._writer.close()
            self._worker.close()

    def __enter__(self) -> PrivacyMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Pending:
    """An asynchronous check whose attack is running."""

    future: Future[Any]
    model: nn.Module
    index: int
    epoch: int | None
    step: int | None
    snapshot: dict[str, Any] | None
    mark: tuple[str, int] | None
    new_mark: bool  # the mark was added by this check (not there from an earlier one)
    accounted: float  # the accountant's ε when the features were taken
    versions: tuple[int, ...]  # the parameters' in-place update counters when it started


def _running_check(
    running: Any,
) -> tuple[tuple[str, int], int | None, int | None] | None:
    """A state's ``"running"`` entry as ``(mark, epoch, step)``; ``None`` when there is none.

    Raises:
        ValueError: When it is not ``{"mark": ["epoch" | "step", n], "epoch": n | None,
            "step": n | None}`` with non-negative int counts.
    """
    if running is None:
        return None

    def count(value: Any, *, optional: bool) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"a running check's epoch and step are counts, got {value}")
        return value

    if not isinstance(running, dict) or set(running) != {"mark", "epoch", "step"}:
        raise ValueError("a running check must hold its mark, its epoch and its step")
    mark = running["mark"]
    if not isinstance(mark, (list, tuple)) or len(mark) != 2 or mark[0] not in ("epoch",
                                                                                "step"):
        raise ValueError("a running check's mark must be an epoch or a step, and a count")
    value = count(mark[1], optional=False)
    assert value is not None
    return ((str(mark[0]), value), count(running["epoch"], optional=True),
            count(running["step"], optional=True))


def _versions(model: Any) -> tuple[int, ...]:
    """The in-place update counters of ``model``'s parameters.

    They move with every optimizer step (and every load): equal counters, same weights.
    """
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return ()
    return tuple(int(p._version) for p in parameters())


def _raised_by(future: Future[Any]) -> bool:
    """Whether ``future`` ended by raising (not: still running, cancelled, or a result)."""
    return future.done() and not future.cancelled() and future.exception() is not None


# Monitors that have had an asynchronous check: their last one is concluded at exit.
_LIVE: weakref.WeakSet[PrivacyMonitor] = weakref.WeakSet()


@atexit.register
def _conclude_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for monitor in list(_LIVE):
        monitor._writer.inline = True  # no new thread may start at exit
        try:
            monitor.flush()
        except BaseException as exc:  # noqa: BLE001 - nothing can be raised to anyone at exit
            log.warning("fesmia-hooks: the last asynchronous check failed at exit: %s",
                        describe_error(exc) if isinstance(exc, Exception) else type(exc).__name__)


_STATE_KEYS = frozenset({
    "version", "run_id", "history", "errors", "checks", "calibration", "budget",
    "should_stop", "stop_reason", "stop_message", "stopped_epoch", "stopped_step", "checked",
    "probe", "canaries", "running", "sequential", "streak",  # the last two: version 1
})
def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


def _copy_state(model: nn.Module) -> dict[str, Any]:
    """A copy of ``model.state_dict()`` that survives later training steps."""
    return _copy_values(model.state_dict())


def _copy_values(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors cloned (quantized ones too), anything else (a module's extra state) deep-copied."""
    return {
        key: value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for key, value in state.items()
    }


def _saved_permutations(state: dict[str, Any]) -> int:
    """Label permutations the saved run was tested with (0 if it made no check)."""
    calibration = state.get("calibration") or {}
    sequential = calibration.get("sequential") if isinstance(calibration, dict) else None
    sequential = sequential if isinstance(sequential, dict) else state.get("sequential") or {}
    value = sequential.get("permutations", 0) if isinstance(sequential, dict) else 0
    if not value:  # no check yet: the probe's own record (an "auto" one was sized already)
        probe = state.get("probe")
        value = probe.get("permutations", 0) if isinstance(probe, dict) else 0
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0
