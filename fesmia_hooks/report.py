"""What one privacy check found: the report, its level, the bands, and the metric keys.

:class:`LeakageReport` holds one check; :class:`Level` and :class:`LevelBands` read it; and
:data:`METRICS` is the one vocabulary of metric keys.

Every list of keys in the project derives from :data:`METRICS`: the report's
:meth:`~LeakageReport.as_dict` and :meth:`~LeakageReport.from_dict`, the keys a budget may
put a ceiling on (:func:`budget_keys`), the scalars written to TensorBoard and to the
frameworks' loggers (:func:`scalar_keys`), and the fields a history reader requires
(:func:`required_keys`). Adding a reading is one entry there.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum
from typing import Any, Literal

import numpy as np

from fesmia_hooks._validation import choice
from fesmia_hooks.exceptions import ConfigurationError

__all__ = [
    "METRICS",
    "TPR_FPRS",
    "LeakageReport",
    "Level",
    "LevelBands",
    "Metric",
    "Readings",
    "budget_keys",
    "required_keys",
    "scalar_keys",
    "share_beyond_chance",
]

#: False-positive rates at which the pooled TPR is reported (0: no false positive at all).
#: A rate finer than one non-member of the canary pool cannot be resolved and reads NaN.
TPR_FPRS: tuple[float, ...] = (0.0, 0.05, 0.1)


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
    """Where the qualitative levels start, on a chance-corrected scale (the same at every N).

    The scale is the **share beyond chance**: with ``N`` query members, an attacker names
    on average ``c`` of them with no false accusation (strict; at most ``ceil(ln 2N)`` false
    accusations, relaxed), a random ranking names ``c0`` (``N / (N + 1)`` strictly), and
    the share is ``(c - c0) / (N - c0)``: 0 at chance, 1 when every member is named, the
    same at every ``N`` (see ``docs/science.md#levels``). A check that is not significant
    at the run-level threshold is ``none`` whatever its reading; a significant one is
    ``low`` below ``moderate``, and so on. The defaults, at ``N = 15`` on the strict
    reading: ``moderate`` from 0.1 (about 2.3 members named with no false accusation,
    where chance names 0.94), ``high`` from 0.3 (about 5.2) and ``critical`` from 0.6
    (about 9.4). These bands are this project's own (the paper's were not available) and
    are configurable.

    Example:
        >>> LevelBands().classify(0.35, significant=True)
        <Level.HIGH: 'high'>
        >>> LevelBands().classify(0.0, significant=True)  # significant, but no more than chance
        <Level.LOW: 'low'>
        >>> LevelBands().classify(0.9, significant=False)
        <Level.NONE: 'none'>
    """

    moderate: float = 0.1
    high: float = 0.3
    critical: float = 0.6
    on: Literal["strict", "relaxed"] = "strict"

    def __post_init__(self) -> None:
        choice("on", self.on, ("strict", "relaxed"))
        values = (self.moderate, self.high, self.critical)
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
            for v in values
        ) or not (values[0] <= values[1] <= values[2]):
            raise ConfigurationError(
                "LevelBands needs 0 < moderate <= high <= critical <= 1, got "
                f"moderate={self.moderate!r}, high={self.high!r}, critical={self.critical!r}"
            )

    def classify(self, share: float, *, significant: bool) -> Level:
        """The level of a check whose share beyond chance is ``share``."""
        if not significant:
            return Level.NONE
        if share >= self.critical:
            return Level.CRITICAL
        if share >= self.high:
            return Level.HIGH
        if share >= self.moderate:
            return Level.MODERATE
        return Level.LOW

    def starts(self) -> dict[Level, float]:
        """The share at which each level above ``low`` starts."""
        return {Level.MODERATE: self.moderate, Level.HIGH: self.high,
                Level.CRITICAL: self.critical}


def share_beyond_chance(named: float, chance: float, queries: int) -> float:
    """How far ``named`` members lie from chance (0) towards all ``queries`` members (1).

    Example:
        >>> share_beyond_chance(15 / 16, 15 / 16, 15), share_beyond_chance(15, 15 / 16, 15)
        (0.0, 1.0)
    """
    room = queries - chance
    return float((named - chance) / room) if room > 0 else 0.0


Role = Literal["position", "leakage", "chance", "test", "level", "probe", "timing", "outcome"]


@dataclass(frozen=True)
class Metric:
    """One key of the shared metric vocabulary.

    Attributes:
        key: The key in :meth:`LeakageReport.as_dict` (``privacy/<key>`` in loggers).
        field: The :class:`LeakageReport` attribute it reads (``None`` for derived keys).
        role: What it is: ``"leakage"`` readings (higher = more leakage, budgetable),
            ``"chance"`` levels, ``"test"`` statistics, the ``"level"``, ``"probe"``
            settings, ``"timing"``, the budget's ``"outcome"`` or the check's ``"position"``.
        scalar: Logged as a number (TensorBoard, framework loggers).
        required: A history line of a check must hold it.
    """

    key: str
    field: str | None
    role: Role
    scalar: bool
    required: bool = False


def _readings(name: str, field: str, required: bool) -> tuple[Metric, ...]:
    return (
        Metric(name, field, "leakage", True, required),
        Metric(name + "_low", field + "_low", "leakage", True),
        Metric(name + "_high", field + "_high", "leakage", True),
        Metric(name + "_episode_low", field + "_episode_low", "leakage", True),
        Metric(name + "_episode_high", field + "_episode_high", "leakage", True),
    )


#: The shared vocabulary, in the order of :meth:`LeakageReport.as_dict`. ``tpr_at_fpr``
#: stands for one key per false-positive rate of :data:`TPR_FPRS` (``tpr_at_fpr_0`` ...).
METRICS: tuple[Metric, ...] = (
    Metric("check", "check", "position", False, True),
    Metric("step", "step", "position", False),
    Metric("epoch", "epoch", "position", False),
    *_readings("log_mia_strict", "strict", True),
    *_readings("log_mia_relaxed", "relaxed", True),
    Metric("chance_strict", "chance_strict", "chance", True, True),
    Metric("chance_relaxed", "chance_relaxed", "chance", True, True),
    *_readings("auc", "auc", False),
    Metric("tpr_at_fpr", "tpr_at_fpr", "leakage", True),
    Metric("members_named", "members_named", "leakage", True),
    Metric("chance_members_named", "chance_members_named", "chance", True),
    Metric("members_named_relaxed", "members_named_relaxed", "leakage", True),
    Metric("chance_members_named_relaxed", "chance_members_named_relaxed", "chance", True),
    Metric("share_beyond_chance", "share_beyond_chance", "leakage", True),
    Metric("p_value", "p_value", "test", True, True),
    Metric("p_threshold", "p_threshold", "test", True, True),
    Metric("significant", "significant", "test", True),
    Metric("can_alarm", "can_alarm", "test", True),
    Metric("statistic", "statistic", "test", False),
    Metric("level", "level", "level", False, True),
    Metric("level_index", None, "level", True),
    Metric("method", "method", "probe", False),
    Metric("shots", "shots", "probe", False),
    Metric("queries", "queries", "probe", False),
    Metric("episodes", "episodes", "probe", False),
    Metric("permutations", "permutations", "probe", False),
    Metric("seconds_forward", "seconds_forward", "timing", True),
    Metric("seconds_attack", "seconds_attack", "timing", True),
    Metric("epsilon_lower_bound", "epsilon_lower_bound", "leakage", True),
    Metric("epsilon_accountant", "epsilon_accountant", "leakage", True),
    Metric("epsilon_confidence", "epsilon_confidence", "test", False),
    Metric("epsilon_delta", "epsilon_delta", "test", False),
    Metric("breached", "breached", "outcome", True),
    Metric("action", "action", "outcome", False),
)


def _expand(metric: Metric) -> list[str]:
    if metric.key == "tpr_at_fpr":
        return [f"tpr_at_fpr_{fpr:g}" for fpr in TPR_FPRS]
    return [metric.key]


def budget_keys() -> list[str]:
    """Keys of :meth:`LeakageReport.as_dict` that read leakage (usable in ``max_values``).

    The Log-MIA readings and their interval bounds, AUC and its bounds, TPR at each FPR, and
    ``members_named``: higher always means more leakage. Chance levels, p-values, sizes and
    timings are not leakage and cannot be budgeted.

    Example:
        >>> "log_mia_strict" in budget_keys() and "p_value" not in budget_keys()
        True
    """
    return [key for m in METRICS if m.role == "leakage" for key in _expand(m)]


def scalar_keys() -> list[str]:
    """Keys of :meth:`LeakageReport.as_dict` that are logged as numbers.

    Example:
        >>> "level_index" in scalar_keys() and "level" not in scalar_keys()
        True
    """
    return [key for m in METRICS if m.scalar for key in _expand(m)]


def required_keys() -> list[str]:
    """Keys every history line of a successful check holds.

    Example:
        >>> required_keys()[:3]
        ['check', 'log_mia_strict', 'log_mia_relaxed']
    """
    return [key for m in METRICS if m.required for key in _expand(m)]


@dataclass(frozen=True)
class Readings:
    """What a check reads, before anyone interprets it: shared by a measurement and a report.

    Each Log-MIA value (and the AUC) is the mean over episodes. ``_low`` / ``_high`` bound
    its 95 % interval over *canary draws* (how much it would move with another canary pool
    of the same data; ``docs/science.md#intervals``); ``_episode_low`` / ``_episode_high``
    bound the narrower interval over episodes of this one pool, as the paper's code reports
    it. Each travels with its chance level. ``members_named`` is the mean number of query
    members named with no false accusation (``_relaxed``: with at most ``ceil(ln 2N)``),
    next to what a random ranking names; ``tpr_at_fpr`` maps false-positive rates to the
    pooled scores' true-positive rate (NaN where the pool cannot resolve the rate).
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
    strict_episode_low: float
    strict_episode_high: float
    relaxed_episode_low: float
    relaxed_episode_high: float
    auc_episode_low: float
    auc_episode_high: float
    members_named: float
    chance_members_named: float
    members_named_relaxed: float
    chance_members_named_relaxed: float


@dataclass(frozen=True)
class LeakageReport(Readings):
    """The result of one privacy check: the probe's readings, calibrated for the run.

    Log-MIA values are means over episodes with 95 % intervals over canary draws (the
    paper's mean ± 1.96 sd/√episodes is kept as the ``_episode_`` interval; see
    ``docs/science.md#intervals`` for what each covers) and always travel with their chance
    level; the level reads ``share_beyond_chance``. ``p_value`` tests "no leakage" by permuting the
    membership labels of the canary pool; ``significant`` compares it with
    ``p_threshold``, which the run's :class:`~fesmia_hooks.Calibration` lowers to keep the
    false-alarm rate per training run (see ``docs/science.md#run-level-test``).

    ``epsilon_lower_bound`` is the one-run audit's empirical lower bound on the run's
    differential-privacy ε at confidence ``epsilon_confidence`` for δ = ``epsilon_delta``
    (0.0 when nothing can be claimed; NaN when the canaries were not included by
    independent coins, :meth:`~fesmia_hooks.CanarySet.for_audit`); ``epsilon_accountant``
    is the ε a DP accountant (Opacus) reports for the same δ at this check, NaN without one
    (``docs/science.md#dp-audit``).
    """

    p_value: float
    p_threshold: float
    significant: bool
    level: Level
    share_beyond_chance: float
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
    can_alarm: bool = True
    statistic: str = "relaxed"
    epsilon_lower_bound: float = math.nan
    epsilon_accountant: float = math.nan
    epsilon_confidence: float = math.nan
    epsilon_delta: float = math.nan
    member_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )
    non_member_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )

    @property
    def seconds_total(self) -> float:
        """Wall time of the check: forward pass plus attack."""
        return self.seconds_forward + self.seconds_attack

    def with_updates(self, **changes: Any) -> LeakageReport:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def summary(self) -> str:
        """One line a person can read: the reading, its chance level, interval and test.

        Example:
            >>> print(_example_report().summary())
            Log-MIA strict 0.50 [0.40, 0.60] (chance 0.18): 3.1 of 15 canary members named with no false accusation, chance 0.94 (share beyond chance 0.15); relaxed 0.80 [0.70, 0.90] (chance 0.59, up to 4 false accusations); AUC 0.81; p = 0.001 <= 0.004 -> level moderate
        """  # noqa: E501
        prefix = f"[epoch {self.epoch}] " if self.epoch is not None else ""
        k = math.ceil(math.log(2 * self.queries)) if self.queries > 0 else 0
        below = (
            f" (below chance {self.chance_strict:.2f})"
            if self.strict < self.chance_strict else f" (chance {self.chance_strict:.2f})"
        )
        test = "<=" if self.significant else ">"
        text = (
            f"{prefix}Log-MIA strict {self.strict:.2f} [{self.strict_low:.2f}, "
            f"{self.strict_high:.2f}]{below}: {self.members_named:.1f} of {self.queries} "
            f"canary members named with no false accusation, chance "
            f"{self.chance_members_named:.2f} (share beyond chance "
            f"{self.share_beyond_chance:.2f}); relaxed {self.relaxed:.2f} "
            f"[{self.relaxed_low:.2f}, {self.relaxed_high:.2f}] (chance "
            f"{self.chance_relaxed:.2f}, up to {k} false accusations); AUC {self.auc:.2f}; "
            f"p = {self.p_value:.3g} {test} {self.p_threshold:.3g} -> level {self.level.value}"
        )
        if math.isfinite(self.epsilon_lower_bound):
            text += (f"; DP audit: ε >= {self.epsilon_lower_bound:.2f} "
                     f"(confidence {_confidence(self.epsilon_confidence)}, "
                     f"δ {self.epsilon_delta:g})")
        if math.isfinite(self.epsilon_accountant):
            text += f"; accountant ε {self.epsilon_accountant:.2f}"
        if not self.can_alarm:
            text += " (this check could not raise an alarm: the run's false-alarm budget "
            text += "had none left for it; see docs/science.md#run-level-test)"
        return text

    def as_dict(self) -> dict[str, Any]:
        """Flat ``{key: number or string}`` for loggers and history files (see :data:`METRICS`).

        The keys are the metric names shared by every integration (prefix them with
        ``privacy/``). Per-canary scores are left out.

        Example:
            >>> d = _example_report().as_dict()
            >>> d["log_mia_strict"], d["level"], d["tpr_at_fpr_0.05"]
            (0.5, 'moderate', 0.4)
        """
        out: dict[str, Any] = {}
        for metric in METRICS:
            if metric.key == "tpr_at_fpr":
                for fpr in TPR_FPRS:
                    out[f"tpr_at_fpr_{fpr:g}"] = self.tpr_at_fpr.get(fpr, math.nan)
            elif metric.key == "level":
                out["level"] = self.level.value
            elif metric.key == "level_index":
                out["level_index"] = self.level.rank
            elif metric.key in ("significant", "breached", "can_alarm"):
                out[metric.key] = bool(getattr(self, str(metric.field)))
            else:
                out[metric.key] = getattr(self, str(metric.field))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeakageReport:
        """Rebuild a report (without per-canary scores) from :meth:`as_dict` output."""
        kwargs: dict[str, Any] = {}
        for metric in METRICS:
            if metric.field is None:
                continue
            if metric.key == "tpr_at_fpr":
                kwargs["tpr_at_fpr"] = {
                    float(k[len("tpr_at_fpr_") :]): float(v)
                    for k, v in data.items()
                    if k.startswith("tpr_at_fpr_")
                }
            elif metric.key in data:
                kwargs[metric.field] = data[metric.key]
        # a history writes NaN as null: a float field read back as None is NaN again
        float_fields = {f.name for f in fields(cls) if f.type in ("float", float)}
        for name in float_fields & set(kwargs):
            if kwargs[name] is None:
                kwargs[name] = math.nan
        if "tpr_at_fpr" in kwargs:
            kwargs["tpr_at_fpr"] = {k: math.nan if v is None else v
                                    for k, v in kwargs["tpr_at_fpr"].items()}
        kwargs["level"] = Level(data.get("level", "none"))
        missing = [key for key in required_keys() if key not in data]
        if missing:
            raise ConfigurationError(
                f"a report needs the keys {', '.join(missing)}; got a dict without them"
            )
        for f in fields(cls):  # readings older histories did not record
            if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
                kwargs[f.name] = math.nan if f.type in ("float", float) else 0
        return cls(**kwargs)


def _confidence(value: float) -> str:
    """A confidence as a person reads it: ``95%``, ``99.58%`` (never rounded up to 100%).

    Example:
        >>> _confidence(0.95), _confidence(0.995833), _confidence(0.9999)
        ('95%', '99.58%', '99.99%')
    """
    for digits in range(0, 6):
        text = f"{value:.{digits}%}"
        if float(text.rstrip("%")) / 100 <= value + 1e-12 and not text.startswith("100"):
            return text
    return f"{value:.6%}"


def _example_report() -> LeakageReport:
    return LeakageReport(
        strict=0.5, strict_low=0.4, strict_high=0.6, relaxed=0.8, relaxed_low=0.7,
        relaxed_high=0.9, chance_strict=0.178, chance_relaxed=0.5884, auc=0.81, auc_low=0.77,
        auc_high=0.85, tpr_at_fpr={0.0: 0.2, 0.05: 0.4, 0.1: 0.5},
        strict_episode_low=0.45, strict_episode_high=0.55, relaxed_episode_low=0.75,
        relaxed_episode_high=0.85, auc_episode_low=0.79, auc_episode_high=0.83,
        members_named=3.1, chance_members_named=0.9375, members_named_relaxed=9.0,
        chance_members_named_relaxed=4.6875, p_value=0.001, p_threshold=0.004,
        significant=True, level=Level.MODERATE, share_beyond_chance=0.154, method="simpleshot",
        shots=5, queries=15, episodes=200, permutations=999, seconds_forward=0.01,
        seconds_attack=0.1,
    )
