"""Privacy budgets: when does leakage call for an alert, a stop or an exception?"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from fesmia_hooks._validation import choice, positive_int
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.report import LeakageReport, Level, budget_keys

__all__ = ["Decision", "LeakageBudget", "StopReason"]

Action = Literal["alert", "stop", "raise"]


class StopReason(str, Enum):
    """Why a monitor asked training to stop (or would have, with ``action="alert"``)."""

    NOT_STOPPED = "not_stopped"
    LEVEL_EXCEEDED = "level_exceeded"
    VALUE_EXCEEDED = "value_exceeded"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    """What a budget says about the latest check.

    Attributes:
        breached: The budget is crossed (after ``patience`` and ``min_checks``).
        should_stop: Training should stop now (``breached`` and ``action`` is not "alert").
        reason: Which rule fired.
        message: A sentence for people, with the numbers and their chance level.
    """

    breached: bool
    should_stop: bool
    reason: StopReason
    message: str


#: ``max_values`` keys read without the run-level test: the audit's ε lower bound is itself
#: a statement at its own confidence, and the accountant's ε is not a measurement at all.
CERTIFIED_KEYS: tuple[str, ...] = ("epsilon_lower_bound", "epsilon_accountant")


class LeakageBudget:
    """A ceiling on leakage, and what to do when a check crosses it.

    A check *crosses* the budget when its reading is significantly above chance (at the
    run-level calibrated threshold; see ``docs/science.md#run-level-test``) **and** its level
    exceeds ``max_level`` or one of ``max_values`` is exceeded. The budget is *breached*
    once ``patience`` consecutive checks have crossed it, and never before ``min_checks``
    checks have run.

    The budget owns its counters (checks seen, the current streak of crossing checks), as
    Lightning's ``EarlyStopping`` owns its ``wait_count``: :meth:`update` counts a report
    and returns the :class:`Decision`; :meth:`state_dict` saves the counters. The run's
    false-alarm rate ``alpha`` and horizon belong to the monitor's
    :class:`~fesmia_hooks.Calibration`, not to the budget.

    Args:
        max_level: Highest level tolerated; a check whose level is above it crosses. The
            default ``"none"`` tolerates no significant leakage: any check whose run-level
            test is significant crosses, whatever its level (the false-alarm rate per run
            stays ``alpha``). ``"low"`` tolerates significant leakage whose share beyond
            chance is below the ``moderate`` band; ``None`` puts no ceiling on the level.
        max_values: Ceilings on leakage readings, by their :meth:`LeakageReport.as_dict`
            key, e.g. ``{"log_mia_strict": 0.4, "auc": 0.7}``. The differential-privacy
            readings ``epsilon_lower_bound`` and ``epsilon_accountant`` cross on their own
            (not only with a significant test): ``{"epsilon_accountant": 8.0}`` stops when
            the accountant's ε passes 8, ``{"epsilon_lower_bound": 1.0}`` when the canaries
            prove ε > 1 at the monitor's ``audit_confidence``.
        patience: Consecutive crossing checks needed for a breach.
        min_checks: Checks to run before any breach.
        action: ``"alert"`` (log and call ``on_breach``), ``"stop"`` (also stop training) or
            ``"raise"`` (also raise :class:`~fesmia_hooks.PrivacyBudgetExceeded`).
        on_breach: Callables ``fn(report, decision)`` called once per breach.

    Example:
        >>> budget = LeakageBudget(max_level="moderate", action="stop")
        >>> budget
        LeakageBudget(max_level='moderate', max_values={}, patience=1, min_checks=1, action='stop')
    """  # noqa: E501

    def __init__(
        self,
        max_level: Level | str | None = "none",
        *,
        max_values: Mapping[str, float] | None = None,
        patience: int = 1,
        min_checks: int = 1,
        action: Action = "stop",
        on_breach: Sequence[Callable[[LeakageReport, Decision], Any]]
        | Callable[[LeakageReport, Decision], Any]
        | None = None,
    ) -> None:
        if max_level is None:
            self.max_level: Level | None = None
        else:
            self.max_level = Level(choice("max_level", str(max_level), [lv.value for lv in Level]))
            if self.max_level == Level.CRITICAL:
                raise ConfigurationError(
                    "`max_level` 'critical' can never be exceeded; use a lower level or None"
                )
        self.max_values = dict(_check_values(max_values or {}))
        if self.max_level is None and not self.max_values:
            raise ConfigurationError(
                "a LeakageBudget needs `max_level` or `max_values`, got neither"
            )
        self.patience = positive_int("patience", patience)
        self.min_checks = positive_int("min_checks", min_checks)
        self.action: Action = choice("action", action, ("alert", "stop", "raise"))  # type: ignore
        callbacks: Iterable[Any]
        if on_breach is None:
            callbacks = ()
        elif callable(on_breach):
            callbacks = (on_breach,)
        else:
            callbacks = tuple(on_breach)
        for fn in callbacks:
            if not callable(fn):
                raise ConfigurationError(
                    f"`on_breach` must hold callables, got {type(fn).__name__}"
                )
        self.on_breach = tuple(callbacks)
        self.reset()

    def __repr__(self) -> str:
        level = None if self.max_level is None else self.max_level.value
        return (
            f"LeakageBudget(max_level={level!r}, max_values={self.max_values}, "
            f"patience={self.patience}, min_checks={self.min_checks}, "
            f"action={self.action!r})"
        )

    def crossing(self, report: LeakageReport) -> tuple[StopReason, str] | None:
        """Whether one report crosses the ceiling, and why; ``None`` if it does not."""
        values = report.as_dict()
        for key in CERTIFIED_KEYS:  # statements of their own: no significance needed
            ceiling = self.max_values.get(key)
            if ceiling is not None and float(values[key]) > ceiling:
                return StopReason.VALUE_EXCEEDED, (
                    f"{key} = {float(values[key]):.3g} exceeds the budget {ceiling:g}"
                )
        if not report.significant:
            return None
        if self.max_level == Level.NONE:
            return StopReason.LEVEL_EXCEEDED, (
                f"significant leakage (level {report.level.value!r}); the budget tolerates "
                "none"
            )
        if self.max_level is not None and report.level > self.max_level:
            return StopReason.LEVEL_EXCEEDED, (
                f"leakage level {report.level.value!r} exceeds the budget "
                f"{self.max_level.value!r}"
            )
        for key, ceiling in self.max_values.items():
            if key not in CERTIFIED_KEYS and float(values[key]) > ceiling:
                return StopReason.VALUE_EXCEEDED, (
                    f"{key} = {float(values[key]):.3g} exceeds the budget {ceiling:g}"
                )
        return None

    def decide(self, report: LeakageReport, *, checks: int, streak: int) -> Decision:
        """Pure decision for the latest report, given the counters (this check included).

        Args:
            report: The latest check.
            checks: Checks run so far, this one included.
            streak: Consecutive crossing checks, this one included (0 if it did not cross).
        """
        return self._decision(report, self.crossing(report), checks=checks, streak=streak)

    def update(self, report: LeakageReport) -> Decision:
        """Count one check (its crossing tested once) and decide.

        Example:
            >>> from fesmia_hooks.report import _example_report
            >>> budget = LeakageBudget(max_level="low", patience=2)
            >>> [budget.update(_example_report()).breached for _ in range(2)], budget.streak
            ([False, True], 2)
        """
        crossed = self.crossing(report)
        self.checks += 1
        self.streak = self.streak + 1 if crossed is not None else 0
        return self._decision(report, crossed, checks=self.checks, streak=self.streak)

    def _decision(
        self,
        report: LeakageReport,
        crossed: tuple[StopReason, str] | None,
        *,
        checks: int,
        streak: int,
    ) -> Decision:
        if crossed is None or streak < self.patience or checks < self.min_checks:
            return Decision(False, False, StopReason.NOT_STOPPED, "within budget")
        reason, why = crossed
        message = (
            f"privacy budget exceeded at check {report.check}"
            + (f" (epoch {report.epoch})" if report.epoch is not None else "")
            + f": {why}; p = {report.p_value:.3g} (run-level threshold "
            f"{report.p_threshold:.3g}). {report.summary()}"
        )
        return Decision(True, self.action != "alert", reason, message)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the counters: a new run starts."""
        self.checks = 0
        self.streak = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters, as plain values."""
        return {"checks": self.checks, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys count as 0)."""
        self.checks = int(state.get("checks", 0))
        self.streak = int(state.get("streak", 0))

    def settings(self) -> dict[str, Any]:
        """The budget's configuration as plain values (written at the top of a history)."""
        return {
            "max_level": None if self.max_level is None else self.max_level.value,
            "max_values": dict(self.max_values),
            "patience": self.patience,
            "min_checks": self.min_checks,
            "action": self.action,
        }


def _check_values(values: Mapping[str, float]) -> Iterable[tuple[str, float]]:
    if not isinstance(values, Mapping):
        raise ConfigurationError(
            f"`max_values` must be a mapping of report keys to numbers, got {type(values).__name__}"
        )
    allowed = budget_keys()
    for key, value in values.items():
        if key not in allowed:
            raise ConfigurationError(
                f"`max_values` key {key!r} is not a leakage reading of the report; allowed: "
                f"{allowed}"
            )
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(
            value, (int, float)
        ):
            raise ConfigurationError(
                f"`max_values` must map report keys to numbers, got {key!r}: {value!r}"
            )
        yield key, float(value)
