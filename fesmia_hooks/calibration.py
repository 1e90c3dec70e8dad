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

import math
from typing import Any

import numpy as np
import torch

from fesmia_hooks._validation import optional_positive_int, probability
from fesmia_hooks.exceptions import ConfigurationError
from fesmia_hooks.measurement import STATISTICS, Measurement
from fesmia_hooks.report import LeakageReport, LevelBands, share_beyond_chance
from fesmia_hooks.sequential import SequentialTest, observed_rank, ranked, ranks_among

__all__ = [
    "DEFAULT_STATISTIC",
    "EPISODE_STATISTIC",
    "Calibration",
    "alarm_components",
    "alarm_statistic",
    "expected_checks",
]

#: The alarm statistic by default: chosen by measured power (see BENCHMARKS.md, item 8).
DEFAULT_STATISTIC = "signal_mean+centroid_strict"
#: The default of a probe that reads no signals (embeddings only): no oriented score.
EPISODE_STATISTIC = "auc+strict"


def alarm_components(statistic: Any) -> tuple[str, ...]:
    """The statistics an alarm statistic reads: ``"auc+strict"`` -> ``("auc", "strict")``.

    Raises:
        ConfigurationError: On a name outside :data:`~fesmia_hooks.measurement.STATISTICS`.

    Example:
        >>> alarm_components("auc+strict")
        ('auc', 'strict')
    """
    parts = tuple(statistic.split("+")) if isinstance(statistic, str) else ()
    if not parts or any(p not in STATISTICS for p in parts) or len(set(parts)) != len(parts):
        raise ConfigurationError(
            f"`statistic` must be one of {', '.join(repr(s) for s in STATISTICS)} or several "
            f"joined by '+' (their min-p combination, e.g. 'auc+strict'), got {statistic!r}"
        )
    return parts


def alarm_statistic(statistic: str, measurement: Measurement) -> tuple[float, torch.Tensor]:
    """The alarm statistic of one check: its observed value and its ``[B]`` null values.

    One name of :data:`~fesmia_hooks.measurement.STATISTICS` is read as it is. Several,
    joined by ``+``, are combined by **min-p**: each trajectory's (the observed one's and
    every permutation's) p-value on each statistic is its rank among all ``B + 1``, and the
    statistic is minus the smallest of them; ties on that smallest p-value (the best
    trajectory on one statistic and the best on another both reach ``1 / (B + 1)``) are
    broken by the mean of the p-values, which moves the statistic by less than half a step.
    It is a symmetric function of the same fixed permutations, so the run-level test stays
    valid (``docs/science.md#run-level-test``).

    Example:
        >>> import torch
        >>> from fesmia_hooks.report import _example_report
        >>> m = Measurement(**{k: v for k, v in _example_report().__dict__.items()
        ...                    if k in Measurement.__dataclass_fields__},
        ...                 statistics={"relaxed": 0.9, "strict": 0.2, "auc": 1.5,
        ...                             "pooled_auc": 0.8, "centroid_strict": 0.1,
        ...                             "centroid_auc": 0.6, "signal_mean": 0.2},
        ...                 null=torch.rand(99, 7, generator=torch.Generator().manual_seed(0)))
        >>> observed, null = alarm_statistic("auc+strict", m)
        >>> round(observed, 4), null.shape  # the AUC beats every permutation: p = 1/100
        (-0.012, torch.Size([99]))
    """
    parts = alarm_components(statistic)
    columns = [STATISTICS.index(p) for p in parts]
    if measurement.null.ndim != 2 or measurement.null.shape[1] != len(STATISTICS):
        raise ConfigurationError(
            f"a measurement's null must be [permutations, {len(STATISTICS)}], one column per "
            f"statistic of fesmia_hooks.measurement.STATISTICS in order, got "
            f"{list(measurement.null.shape)}"
        )
    null = measurement.null.detach().to("cpu", torch.float64).numpy()[:, columns]  # [B, K]
    missing = [p for p, col in zip(parts, null.T, strict=True) if bool(np.isnan(col).all())]
    unreadable = [p for p in missing if math.isnan(measurement.statistics.get(p, math.nan))]
    if unreadable and null.shape[0] > 0:
        raise ConfigurationError(
            f"statistic {statistic!r} reads {', '.join(repr(p) for p in unreadable)}, which "
            "this check could not compute (NaN even under the true labels): 'signal_mean' "
            "needs signal columns (a probe reading embeddings alone has none; FeSMIA.attack "
            "takes signal_columns=); test another statistic, e.g. 'auc+strict'"
        )
    if missing and null.shape[0] > 0:
        raise ConfigurationError(
            f"statistic {statistic!r} reads {', '.join(repr(p) for p in missing)}, which the "
            "probe did not compute under its permutations; a probe computes only the "
            "statistics it is asked for: call probe.use_statistics(fesmia_hooks.calibration."
            f"alarm_components({statistic!r})) before measuring (a PrivacyMonitor does this "
            "for its own statistic)"
        )
    observed = np.array([[measurement.statistics[p] for p in parts]], dtype=np.float64)
    if len(parts) == 1:
        return float(observed[0, 0]), torch.from_numpy(np.ascontiguousarray(null[:, 0]))
    # [K, B + 1], a NaN ranked below everything (as by permutation_p_values)
    every = ranked(np.concatenate([null, observed]).T).reshape(len(parts), -1)
    # each trajectory's p-value on each statistic: its rank among all B + 1, over B + 1
    p = np.stack([ranks_among(column) for column in every]) / every.shape[1]
    # torch's mean over K of the [K, B + 1] array read as [B + 1, K]: the columns added in
    # the order they always have been (the statistic's rounding does not move)
    mean = torch.from_numpy(p).T.mean(1).numpy()
    combined = torch.from_numpy(-p.min(0) - mean / (2 * every.shape[1]))
    return float(combined[-1]), combined[:-1]


class Calibration:
    """Run-level significance and levels for the checks of one training run.

    Args:
        alpha: False-alarm rate allowed per training run when nothing leaks.
        horizon: Expected number of checks, when you know it; spends ``alpha`` over them.
            ``None`` lets the framework adapter set it from the run's limits (see
            :func:`expected_checks`), or spends ``alpha`` as ``alpha * c / (c + 10)``.
        bands: Where the qualitative levels start (on the share beyond chance).
        statistic: The alarm statistic, computed on the probe's fixed permutations: one of
            :data:`~fesmia_hooks.measurement.STATISTICS` or several joined by ``+`` (their
            min-p combination); see :func:`alarm_statistic`.

    Example:
        >>> import torch
        >>> from fesmia_hooks.measurement import Measurement
        >>> m = Measurement(strict=0.6, strict_low=0.5, strict_high=0.7, relaxed=0.9,
        ...                 relaxed_low=0.85, relaxed_high=0.95, chance_strict=0.178,
        ...                 chance_relaxed=0.588, auc=0.9, auc_low=0.85, auc_high=0.95,
        ...                 tpr_at_fpr={}, strict_episode_low=0.55, strict_episode_high=0.65,
        ...                 relaxed_episode_low=0.87, relaxed_episode_high=0.93,
        ...                 auc_episode_low=0.88, auc_episode_high=0.92, members_named=4.0,
        ...                 chance_members_named=0.9375, members_named_relaxed=11.0,
        ...                 chance_members_named_relaxed=4.6875,
        ...                 statistics=dict.fromkeys(STATISTICS, 0.9),
        ...                 null=torch.linspace(0.4, 0.7, 99)[:, None].repeat(1, 7), queries=15)
        >>> report = Calibration(alpha=0.05, horizon=1).report(m, check=1)
        >>> report.p_value, report.significant, report.level.value, report.can_alarm
        (0.01, True, 'moderate', True)
    """

    def __init__(
        self,
        alpha: float = 0.05,
        *,
        horizon: int | None = None,
        bands: LevelBands | None = None,
        statistic: str = DEFAULT_STATISTIC,
    ) -> None:
        self.alpha = probability("alpha", alpha)
        alarm_components(statistic)
        self.statistic = statistic
        self.fixed_horizon = optional_positive_int("horizon", horizon)
        if bands is not None and not isinstance(bands, LevelBands):
            raise ConfigurationError(
                f"`bands` must be a LevelBands or None, got {type(bands).__name__}"
            )
        self.bands = bands if bands is not None else LevelBands()
        self.reset()

    def __repr__(self) -> str:
        return (
            f"Calibration(alpha={self.alpha}, horizon={self.horizon}, bands={self.bands}, "
            f"statistic={self.statistic!r})"
        )

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
        observed, null = alarm_statistic(self.statistic, measurement)
        p_value, threshold, significant = self._test.update(observed, null)
        return self._report(measurement, p_value, threshold, significant, check, epoch, step,
                            can_alarm=self._test.could_alarm)

    def single_check(self, measurement: Measurement, *, check: int = 0) -> LeakageReport:
        """The report of a check read on its own, at level ``alpha`` (no run, no state)."""
        observed, null = alarm_statistic(self.statistic, measurement)
        p_value = observed_rank(observed, null) / (int(null.numel()) + 1)
        return self._report(measurement, p_value, self.alpha, p_value <= self.alpha, check,
                            None, None, can_alarm=self.alpha >= 1 / (int(null.numel()) + 1))

    def permutations_needed(self) -> int | None:
        """Permutations that give every expected check of the run its own chance to alarm.

        The run-level test lets at most ``alpha * (B + 1)`` trajectories alarm over the
        whole run; with at least one per expected check, no check is starved. ``None``
        without a horizon.

        Example:
            >>> Calibration(alpha=0.05, horizon=100).permutations_needed()
            1999
        """
        if self.horizon is None:
            return None
        return math.ceil(self.horizon / self.alpha) - 1

    def _report(
        self,
        m: Measurement,
        p_value: float,
        threshold: float,
        significant: bool,
        check: int,
        epoch: int | None,
        step: int | None,
        *,
        can_alarm: bool,
    ) -> LeakageReport:
        if self.bands.on == "strict":
            share = share_beyond_chance(m.members_named, m.chance_members_named, m.queries)
        else:
            share = share_beyond_chance(m.members_named_relaxed, m.chance_members_named_relaxed,
                                        m.queries)
        return LeakageReport(
            **m.readings(),
            p_value=p_value,
            p_threshold=threshold,
            significant=bool(significant),
            level=self.bands.classify(share, significant=significant),
            share_beyond_chance=share,
            check=check,
            epoch=epoch,
            step=step,
            can_alarm=bool(can_alarm),
            statistic=self.statistic,
        )

    def settings(self) -> dict[str, Any]:
        """Plain values that interpret a run (written at the top of its history)."""
        b = self.bands
        return {
            "alpha": self.alpha,
            "horizon": self.horizon,
            "statistic": self.statistic,
            "bands": {"moderate": b.moderate, "high": b.high, "critical": b.critical, "on": b.on},
        }

    def state_dict(self) -> dict[str, Any]:
        """The run-level test's state and the horizon in force."""
        return {"horizon": self.horizon, "alpha": self.alpha, "statistic": self.statistic,
                "sequential": self._test.state_dict()}

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
