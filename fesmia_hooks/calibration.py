"""Calibration: from what the probe measured to what a person reads and a budget acts on.

One :class:`Calibration` per monitor owns everything that interprets a run: the false-alarm
rate ``alpha`` allowed per training run, the expected number of checks (the horizon over
which ``alpha`` is spent), the level bands, and the run-level test
(:class:`~fesmia_hooks.sequential.SequentialTest`). It turns each
:class:`~fesmia_hooks.measurement.Measurement` into a :class:`~fesmia_hooks.LeakageReport`
exactly once: p-value, run-level threshold, significance and level. See
``docs/science.md#run-level-test`` and ``docs/science.md#levels``.
"""

from __future__ import annotations

from typing import Any

from fesmia_hooks._validation import optional_positive_int, probability
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.measurement import Measurement
from fesmia_hooks.report import LeakageReport, LevelBands
from fesmia_hooks.sequential import SequentialTest, permutation_p_values

__all__ = ["Calibration", "expected_checks"]


class Calibration:
    """Run-level significance and levels for the checks of one training run.

    Args:
        alpha: False-alarm rate allowed per training run when nothing leaks.
        horizon: Expected number of checks, when you know it; spends ``alpha`` evenly over
            them. ``None`` lets the framework adapter set it from the run's limits (see
            :func:`expected_checks`), or spends ``alpha`` as ``alpha * c / (c + 10)``.
        bands: Where the qualitative levels start.

    Example:
        >>> import torch
        >>> from fesmia_hooks.measurement import Measurement
        >>> m = Measurement(strict=0.6, strict_low=0.5, strict_high=0.7, relaxed=0.9,
        ...                 relaxed_low=0.85, relaxed_high=0.95, chance_strict=0.178,
        ...                 chance_relaxed=0.588, auc=0.9, auc_low=0.85, auc_high=0.95,
        ...                 tpr_at_fpr={}, statistic=0.9, null=torch.linspace(0.4, 0.7, 99),
        ...                 queries=15)
        >>> report = Calibration(alpha=0.05, horizon=1).report(m, check=1)
        >>> report.p_value, report.significant, report.level.value
        (0.01, True, 'high')
    """

    def __init__(
        self,
        alpha: float = 0.05,
        *,
        horizon: int | None = None,
        bands: LevelBands | None = None,
    ) -> None:
        self.alpha = probability("alpha", alpha)
        self.fixed_horizon = optional_positive_int("horizon", horizon)
        if bands is not None and not isinstance(bands, LevelBands):
            raise ConfigurationError(
                f"`bands` must be a LevelBands or None, got {type(bands).__name__}"
            )
        self.bands = bands if bands is not None else LevelBands()
        self.reset()

    def __repr__(self) -> str:
        return f"Calibration(alpha={self.alpha}, horizon={self.horizon}, bands={self.bands})"

    @property
    def horizon(self) -> int | None:
        """The horizon in force: the fixed one, or the one the run set with :meth:`reset`."""
        return self._test.horizon

    def reset(self, *, horizon: int | None = None) -> None:
        """Start a new run; ``horizon`` applies when none was fixed at construction."""
        expected = optional_positive_int("horizon", horizon)
        chosen = self.fixed_horizon if self.fixed_horizon is not None else expected
        self._test = SequentialTest(alpha=self.alpha, horizon=chosen)

    def report(
        self,
        measurement: Measurement,
        *,
        check: int,
        epoch: int | None = None,
        step: int | None = None,
    ) -> LeakageReport:
        """The report of one check of the run (updates the run-level test)."""
        p_value, threshold, significant = self._test.update(
            measurement.statistic, measurement.null
        )
        return self._report(measurement, p_value, threshold, significant, check, epoch, step)

    def single_check(self, measurement: Measurement, *, check: int = 0) -> LeakageReport:
        """The report of a check read on its own, at level ``alpha`` (no run, no state)."""
        rank, _ = permutation_p_values(measurement.statistic, measurement.null)
        p_value = rank / (int(measurement.null.numel()) + 1)
        return self._report(
            measurement, p_value, self.alpha, p_value <= self.alpha, check, None, None
        )

    def _report(
        self,
        m: Measurement,
        p_value: float,
        threshold: float,
        significant: bool,
        check: int,
        epoch: int | None,
        step: int | None,
    ) -> LeakageReport:
        reading = m.strict if self.bands.on == "strict" else m.relaxed
        return LeakageReport(
            **m.readings(),
            p_value=p_value,
            p_threshold=threshold,
            significant=bool(significant),
            level=self.bands.classify(reading, significant=significant),
            check=check,
            epoch=epoch,
            step=step,
        )

    def settings(self) -> dict[str, Any]:
        """Plain values that interpret a run (written at the top of its history)."""
        b = self.bands
        return {
            "alpha": self.alpha,
            "horizon": self.horizon,
            "bands": {"moderate": b.moderate, "high": b.high, "critical": b.critical, "on": b.on},
        }

    def state_dict(self) -> dict[str, Any]:
        """The run-level test's state and the horizon in force."""
        return {"horizon": self.horizon, "sequential": self._test.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys keep their defaults)."""
        horizon = state.get("horizon", self.horizon)
        self._test = SequentialTest(alpha=self.alpha, horizon=horizon)
        self._test.load_state_dict(state.get("sequential", {}))


def expected_checks(
    *,
    every_n_epochs: int | None,
    every_n_steps: int | None,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> int | None:
    """Checks a run will make, from whichever limit ends it first (``None`` if unknown).

    Limits that are ``None``, zero or negative (Lightning's ``-1``) are no limit.

    Example:
        >>> expected_checks(every_n_epochs=1, every_n_steps=None, max_epochs=1000,
        ...                 max_steps=300, steps_per_epoch=10)
        30
        >>> expected_checks(every_n_epochs=None, every_n_steps=50, max_epochs=3,
        ...                 steps_per_epoch=40)
        2
    """

    def limit(value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            return None
        return int(value)

    epochs, steps, per = limit(max_epochs), limit(max_steps), limit(steps_per_epoch)
    if every_n_steps is not None:
        by_epochs = epochs * per if epochs is not None and per is not None else None
        total = min((s for s in (steps, by_epochs) if s is not None), default=None)
        every = every_n_steps
    else:
        by_steps = -(-steps // per) if steps is not None and per is not None else None
        total = min((e for e in (epochs, by_steps) if e is not None), default=None)
        every = every_n_epochs or 1
    if total is None:
        return None
    return max(1, total // every)
