"""What one privacy check found: :class:`LeakageReport`, its :class:`Level` and the bands."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Literal

import numpy as np

from fesmia_hooks._validation import choice
from fesmia_hooks.exceptions import ConfigurationError

__all__ = ["TPR_FPRS", "LeakageReport", "Level", "LevelBands", "budget_keys"]

#: False-positive rates at which the pooled TPR is reported.
TPR_FPRS: tuple[float, ...] = (0.01, 0.05, 0.1)


class Level(str, Enum):
    """Qualitative leakage level, ordered ``none < low < moderate < high < critical``.

    Example:
        >>> Level("high") > Level.MODERATE
        True
        >>> Level.LOW.value
        'low'
    """

    NONE = "none"
    LOW = "low"
    MODERATE = "moderate"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """Position in the order, ``none`` = 0 … ``critical`` = 4."""
        return list(Level).index(self)

    def __lt__(self, other: object) -> bool:
        return self.rank < Level(other).rank  # type: ignore[arg-type]

    def __le__(self, other: object) -> bool:
        return self.rank <= Level(other).rank  # type: ignore[arg-type]

    def __gt__(self, other: object) -> bool:
        return self.rank > Level(other).rank  # type: ignore[arg-type]

    def __ge__(self, other: object) -> bool:
        return self.rank >= Level(other).rank  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LevelBands:
    """Where the qualitative levels start, on one Log-MIA reading.

    A reading that is not significantly above chance is always ``none``. A significant one is
    ``low`` below ``moderate``, and so on. The defaults, on the strict Log-MIA with 15
    queries per class, read as: ``moderate`` from 0.25 (about 1 member of 15 named with no
    false accusation), ``high`` from 0.5 (about 3) and ``critical`` from 0.75 (about 7).
    These bands are this project's own (the paper's were not available) and are configurable.

    Example:
        >>> LevelBands().classify(0.6, significant=True)
        <Level.HIGH: 'high'>
        >>> LevelBands().classify(0.9, significant=False)
        <Level.NONE: 'none'>
    """

    moderate: float = 0.25
    high: float = 0.5
    critical: float = 0.75
    on: Literal["strict", "relaxed"] = "strict"

    def __post_init__(self) -> None:
        choice("on", self.on, ("strict", "relaxed"))
        values = (self.moderate, self.high, self.critical)
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in values) or not (
            values[0] <= values[1] <= values[2]
        ):
            raise ConfigurationError(
                "LevelBands needs 0 <= moderate <= high <= critical <= 1, got "
                f"moderate={self.moderate!r}, high={self.high!r}, critical={self.critical!r}"
            )

    def classify(self, value: float, *, significant: bool) -> Level:
        """The level of a reading ``value`` on the band's scale."""
        if not significant:
            return Level.NONE
        if value >= self.critical:
            return Level.CRITICAL
        if value >= self.high:
            return Level.HIGH
        if value >= self.moderate:
            return Level.MODERATE
        return Level.LOW


@dataclass(frozen=True)
class LeakageReport:
    """The result of one privacy check.

    Log-MIA values are means over episodes with 95 % intervals (mean ± 1.96 sd/√episodes,
    as in the paper's code) and always travel with their chance level. ``p_value`` tests "no
    leakage" by permuting the membership labels of the canary pool; ``significant`` compares
    it with ``p_threshold``, which a :class:`~fesmia_hooks.PrivacyMonitor` lowers to keep the
    false-alarm rate per training run (see :mod:`fesmia_hooks.sequential`).
    """

    strict: float
    strict_low: float
    strict_high: float
    relaxed: float
    relaxed_low: float
    relaxed_high: float
    chance_strict: float
    chance_relaxed: float
    auc: float
    auc_low: float
    auc_high: float
    tpr_at_fpr: dict[float, float]
    p_value: float
    p_threshold: float
    significant: bool
    level: Level
    method: str
    shots: int
    queries: int
    episodes: int
    permutations: int
    seconds_forward: float
    seconds_attack: float
    check: int = 0
    step: int | None = None
    epoch: int | None = None
    breached: bool = False
    action: str = "none"
    member_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )
    non_member_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )
    null_statistics: Any = field(default=None, repr=False, compare=False)

    @property
    def seconds_total(self) -> float:
        """Wall time of the check: forward pass plus attack."""
        return self.seconds_forward + self.seconds_attack

    @property
    def members_named(self) -> float:
        """Members an attacker names with no false accusation, read off the strict value."""
        return (self.queries + 1) ** self.strict - 1

    def with_updates(self, **changes: Any) -> LeakageReport:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def summary(self) -> str:
        """One line a person can read.

        Example:
            >>> print(_example_report().summary())
            Log-MIA strict 0.50 [0.45, 0.55]: about 3 of 15 canary members named with no false accusation (chance 0.18); relaxed 0.80 (chance 0.59); AUC 0.81; p = 0.001 -> level high
        """  # noqa: E501
        where = []
        if self.epoch is not None:
            where.append(f"epoch {self.epoch}")
        prefix = f"[{', '.join(where)}] " if where else ""
        named = self.members_named
        return (
            f"{prefix}Log-MIA strict {self.strict:.2f} [{self.strict_low:.2f}, "
            f"{self.strict_high:.2f}]: about {named:.0f} of {self.queries} canary members named "
            f"with no false accusation (chance {self.chance_strict:.2f}); relaxed "
            f"{self.relaxed:.2f} (chance {self.chance_relaxed:.2f}); AUC {self.auc:.2f}; "
            f"p = {self.p_value:.3g} -> level {self.level.value}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Flat ``{key: number or string}`` for loggers and history files.

        The keys are the metric names shared by every integration (prefix them with
        ``privacy/``). Per-canary scores are left out.

        Example:
            >>> d = _example_report().as_dict()
            >>> d["log_mia_strict"], d["level"], d["tpr_at_fpr_0.05"]
            (0.5, 'high', 0.4)
        """
        out: dict[str, Any] = {
            "check": self.check,
            "step": self.step,
            "epoch": self.epoch,
            "log_mia_strict": self.strict,
            "log_mia_strict_low": self.strict_low,
            "log_mia_strict_high": self.strict_high,
            "log_mia_relaxed": self.relaxed,
            "log_mia_relaxed_low": self.relaxed_low,
            "log_mia_relaxed_high": self.relaxed_high,
            "chance_strict": self.chance_strict,
            "chance_relaxed": self.chance_relaxed,
            "auc": self.auc,
            "auc_low": self.auc_low,
            "auc_high": self.auc_high,
        }
        for fpr, tpr in sorted(self.tpr_at_fpr.items()):
            out[f"tpr_at_fpr_{fpr:g}"] = tpr
        out.update(
            {
                "p_value": self.p_value,
                "p_threshold": self.p_threshold,
                "significant": bool(self.significant),
                "level": self.level.value,
                "level_index": self.level.rank,
                "members_named": self.members_named,
                "method": self.method,
                "shots": self.shots,
                "queries": self.queries,
                "episodes": self.episodes,
                "permutations": self.permutations,
                "seconds_forward": self.seconds_forward,
                "seconds_attack": self.seconds_attack,
                "breached": bool(self.breached),
                "action": self.action,
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeakageReport:
        """Rebuild a report (without per-canary scores) from :meth:`as_dict` output."""
        tpr = {
            float(k[len("tpr_at_fpr_") :]): float(v)
            for k, v in data.items()
            if k.startswith("tpr_at_fpr_")
        }
        names = {f.name for f in fields(cls)}
        renamed = {
            "strict": "log_mia_strict",
            "strict_low": "log_mia_strict_low",
            "strict_high": "log_mia_strict_high",
            "relaxed": "log_mia_relaxed",
            "relaxed_low": "log_mia_relaxed_low",
            "relaxed_high": "log_mia_relaxed_high",
        }
        kwargs: dict[str, Any] = {}
        for name in names - {"member_scores", "non_member_scores", "null_statistics"}:
            key = renamed.get(name, name)
            if name == "tpr_at_fpr":
                kwargs[name] = tpr
            elif key in data:
                kwargs[name] = data[key]
        kwargs["level"] = Level(data.get("level", "none"))
        return cls(**kwargs)


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % interval ``mean ± 1.96 sd / sqrt(n)`` of per-episode values.

    Example:
        >>> mean_interval(np.array([0.0, 1.0]))
        (0.5, -0.48, 1.48)
    """
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return round(m, 12), round(m - half, 12), round(m + half, 12)


def budget_keys() -> list[str]:
    """Keys of :meth:`LeakageReport.as_dict` that read leakage (usable in ``max_values``).

    The Log-MIA readings and their interval bounds, AUC and its bounds, TPR at each FPR, and
    ``members_named``: higher always means more leakage. Chance levels, p-values, sizes and
    timings are not leakage and cannot be budgeted.

    Example:
        >>> "log_mia_strict" in budget_keys() and "p_value" not in budget_keys()
        True
    """
    leakage = ("log_mia_", "auc", "tpr_at_fpr_", "members_named")
    return [k for k in _example_report().as_dict() if k.startswith(leakage)]


def _example_report() -> LeakageReport:
    return LeakageReport(
        strict=0.5, strict_low=0.45, strict_high=0.55, relaxed=0.8, relaxed_low=0.75,
        relaxed_high=0.85, chance_strict=0.178, chance_relaxed=0.5884, auc=0.81, auc_low=0.79,
        auc_high=0.83, tpr_at_fpr={0.01: 0.2, 0.05: 0.4, 0.1: 0.5}, p_value=0.001,
        p_threshold=0.004,
        significant=True, level=Level.HIGH, method="simpleshot", shots=5, queries=15,
        episodes=200, permutations=999, seconds_forward=0.01, seconds_attack=0.1,
    )
