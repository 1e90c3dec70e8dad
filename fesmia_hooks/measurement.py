"""What the probe measured at one check, before the run's calibration reads it.

A :class:`Measurement` holds the readings of one check (each Log-MIA value with its
interval and chance level, the AUC, TPR at fixed false-positive rates, the pooled canary
scores) and what the run-level test needs: the observed test statistic and its values
under the probe's fixed label permutations. It says nothing about significance or levels;
:class:`~fesmia_hooks.calibration.Calibration` turns it into a
:class:`~fesmia_hooks.LeakageReport` once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fesmia_hooks.logmia import relaxed_false_positives
from fesmia_hooks.readings import row_readings
from fesmia_hooks.report import TPR_FPRS, Readings

__all__ = [
    "CENTROID_STATISTICS",
    "EPISODE_STATISTICS",
    "POOL_STATISTICS",
    "STATISTICS",
    "Measurement",
    "canary_interval",
    "canary_intervals",
    "linear_percentiles",
    "statistics_of",
    "episode_statistics",
    "mean_interval",
    "tpr_at_fpr",
]

#: The statistics of the permutation test, in the order of :attr:`Measurement.null`'s
#: columns: mean relaxed and strict Log-MIA over episodes, mean episode AUC, the AUC of
#: each canary's score pooled over the episodes where it was a query; two readings of the
#: whole pool's leave-one-out nearest-centroid ranking, its strict Log-MIA (``N`` = the
#: members) and its AUC (see :func:`fesmia_hooks.fused.centroid_readings`); and the
#: members' mean minus the non-members' mean of a label-free signal score (the mean of the
#: standardised signals, each oriented "higher = more member-like").
STATISTICS: tuple[str, ...] = ("relaxed", "strict", "auc", "pooled_auc", "centroid_strict",
                               "centroid_auc", "signal_mean")
#: The statistics read from the few-shot episodes (each permutation solves them all again).
EPISODE_STATISTICS: tuple[str, ...] = STATISTICS[:4]
#: The statistics read from the whole pool at once (no episodes: cheap under permutations).
POOL_STATISTICS: tuple[str, ...] = STATISTICS[4:]
#: The whole pool's centroid ranking (its AUC, when computed, brings the strict count along).
CENTROID_STATISTICS: tuple[str, ...] = ("centroid_strict", "centroid_auc")


@dataclass(frozen=True)
class Measurement(Readings):
    """The readings of one check, with what the run-level test needs of it.

    Attributes:
        statistics: Each test statistic of :data:`STATISTICS` under the true labels
            (higher = more leakage).
        null: ``[B, len(STATISTICS)]`` the same statistics under each of the probe's fixed
            label permutations, in the same order at every check.
        audit_scores: ``[n]`` a label-free score of every canary (members first; higher =
            more member-like), for the ε lower bound of :mod:`fesmia_hooks.epsilon`: one
            signal of the model's output, never a score fitted on membership labels. Empty
            when the probe reads no such signal.
    """

    statistics: dict[str, float]
    null: torch.Tensor = field(repr=False, compare=False)
    method: str = "custom"
    shots: int = 0
    queries: int = 0
    episodes: int = 0
    permutations: int = 0
    seconds_forward: float = 0.0
    seconds_attack: float = 0.0
    member_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )
    non_member_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )
    audit_scores: np.ndarray = field(
        default_factory=lambda: np.empty(0), repr=False, compare=False
    )

    def readings(self) -> dict[str, Any]:
        """Every field but the test's statistic and null, by name (a report's readings)."""
        skip = ("statistics", "null", "audit_scores")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


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


def episode_statistics(
    scores: torch.Tensor,
    is_query_member: torch.Tensor,
    query_slots: torch.Tensor,
    num_members: int,
    pool: int,
    *,
    pooled: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-episode readings and the test statistics of groups of episodes.

    Args:
        scores: ``[G, E, 2q]`` learner scores of ``G`` groups (the true labels, or one label
            permutation each) of ``E`` episodes.
        is_query_member: ``[2q]`` booleans of the query positions.
        query_slots: ``[E, 2q]`` pool slots of the query positions (the same in every
            group; slots below ``num_members`` hold members).
        num_members: Member slots of the pool.
        pool: Slots in the pool.
        pooled: Compute ``pooled_auc`` (needs the same ``query_slots`` in every group).

    Returns:
        ``{"tp_strict", "tp_relaxed", "strict_episodes", "relaxed_episodes",
        "auc_episodes": [G, E]}`` per episode, and each name of
        :data:`EPISODE_STATISTICS` as ``[G]``.
    """
    g, e, q2 = scores.shape
    flat = scores.reshape(g * e, q2)
    tp0, tpk, auc = row_readings(flat, is_query_member, relaxed_false_positives(q2))
    pooled_auc = None
    if pooled:
        means = pooled_scores(scores, query_slots, pool)
        seen = torch.bincount(query_slots.reshape(-1).to(scores.device), minlength=pool) > 0
        member = (torch.arange(pool, device=scores.device) < num_members)[seen]
        _, _, pooled_auc = row_readings(means[:, seen], member, 0)
    return statistics_of(tp0.reshape(g, e), tpk.reshape(g, e), auc.reshape(g, e),
                         int(is_query_member.sum()), pooled_auc)


def pooled_scores(scores: torch.Tensor, query_slots: torch.Tensor, pool: int) -> torch.Tensor:
    """``[G, pool]``: each slot's mean score over the episodes where it was a query.

    ``scores`` is ``[G, E, 2q]`` (or ``[E, 2q]``, one group) and ``query_slots`` ``[E, 2q]``;
    a slot never queried reads NaN.

    Example:
        >>> s = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
        >>> pooled_scores(s, torch.tensor([[0, 2], [0, 1]]), 4).tolist()
        [[2.0, 2.0, 0.0, nan]]
    """
    scores = scores.reshape(-1, *query_slots.shape)
    index = query_slots.reshape(-1).to(scores.device)
    total = torch.zeros(scores.shape[0], pool, dtype=torch.float64, device=scores.device)
    total.index_add_(1, index, scores.reshape(scores.shape[0], -1).double())
    count = torch.bincount(index, minlength=pool).to(total.dtype)
    return total / count.where(count > 0, torch.full_like(count, float("nan")))


def statistics_of(
    tp_strict: torch.Tensor,
    tp_relaxed: torch.Tensor,
    auc: torch.Tensor,
    query_members: int,
    pooled_auc: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-episode readings and group statistics from ``[G, E]`` counts and AUCs.

    ``pooled_auc`` (``[G]``) is passed through when given. See :func:`episode_statistics`
    for the keys.
    """
    denom = math.log(query_members + 1)
    strict = torch.log1p(tp_strict.to(torch.float32)) / denom
    relaxed = torch.log1p(tp_relaxed.to(torch.float32)) / denom
    out = {
        "tp_strict": tp_strict,
        "tp_relaxed": tp_relaxed,
        "auc_episodes": auc,
        "relaxed": relaxed.mean(1),
        "strict": strict.mean(1),
        "auc": auc.mean(1),
        "strict_episodes": strict,
        "relaxed_episodes": relaxed,
    }
    if pooled_auc is not None:
        out["pooled_auc"] = pooled_auc
    return out


def canary_interval(
    value: float,
    full_episodes: np.ndarray,
    half_episodes: np.ndarray,
    scale: float,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[float, float]:
    """95 % interval of a reading over canary pools, from episodes inside half-pools.

    ``half_episodes`` is ``[halves, episodes]`` per-episode values inside random half-pools
    (see :class:`~fesmia_hooks.episodes.HalfPlan`). The half-pools' readings spread around
    their mean as readings of other pools would spread around this one's, plus the noise
    of their own few episodes. Their deviations are shrunk to remove that noise (the
    within-half episode variance) and multiplied by ``sqrt(scale)``; the interval runs from
    their 2.5th to their 97.5th percentile around ``value`` (a percentile interval, so a
    skewed reading gets a skewed interval), each end widened in quadrature by the full
    pool's own episode noise (``1.96 sd / sqrt(E)``).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> lo, hi = canary_interval(0.5, rng.random(100), rng.random((200, 20)), 1.0)
        >>> lo < 0.5 < hi
        True
    """
    if half_episodes.size == 0 or not np.isfinite(scale):
        return math.nan, math.nan
    (low, high), = canary_intervals(np.array([value]), full_episodes[None],
                                    half_episodes[None], scale, bounds=bounds)
    return low, high


def canary_intervals(
    values: np.ndarray,
    full_episodes: np.ndarray,
    half_episodes: np.ndarray,
    scale: float,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> list[tuple[float, float]]:
    """:func:`canary_interval` of ``K`` readings at once (one pass of array operations).

    Args:
        values: ``[K]`` the readings.
        full_episodes: ``[K, E]`` their per-episode values on the full pool.
        half_episodes: ``[K, halves, episodes]`` their per-episode values in the half-pools.
        scale: As :func:`canary_interval`.
        bounds: The readings' range, where the intervals are clipped.
    """
    if half_episodes.size == 0 or not np.isfinite(scale):
        return [(math.nan, math.nan)] * len(values)
    means = half_episodes.mean(2)  # [K, halves]
    spread = means.var(1, ddof=1)
    within = half_episodes.var(2, ddof=1).mean(1) / half_episodes.shape[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.where(spread > 0,
                          np.sqrt(np.maximum(spread - within, 0.0) / spread), 0.0)
    deviations = (means - means.mean(1, keepdims=True)) * shrink[:, None] * math.sqrt(scale)
    below, above = linear_percentiles(deviations, (0.025, 0.975))
    episode = 1.96 * np.sqrt(full_episodes.var(1, ddof=1) / full_episodes.shape[1])
    low, high = bounds
    return [(round(max(low, float(v) - math.hypot(float(b), float(e))), 12),
             round(min(high, float(v) + math.hypot(float(a), float(e))), 12))
            for v, b, a, e in zip(values, below, above, episode, strict=True)]


def linear_percentiles(rows: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """``[len(quantiles), K]``: quantiles of each of the ``K`` rows, linearly interpolated.

    The sample quantile that ``np.quantile`` computes by default (Hyndman and Fan's
    definition 7), with the same arithmetic, without its general machinery (a few
    microseconds, not a few hundred, for the intervals of every check). A row holding a NaN
    gives NaN.

    Example:
        >>> linear_percentiles(np.array([[3.0, 1.0, 2.0, 4.0]]), (0.25, 0.5)).tolist()
        [[1.75], [2.5]]
    """
    ordered = np.sort(rows, axis=1)
    n = ordered.shape[1]
    out = np.empty((len(quantiles), ordered.shape[0]))
    for i, q in enumerate(quantiles):
        at = (n - 1) * q  # np.quantile's virtual index, the same operation
        low = min(max(math.floor(at), 0), n - 1)
        a, b = ordered[:, low], ordered[:, min(low + 1, n - 1)]
        gamma = at - math.floor(at) if 0 <= at < n - 1 else 0.0
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, as numpy gives
            # lerp from whichever end is nearer, as numpy does
            out[i] = a + (b - a) * gamma if gamma < 0.5 else b - (b - a) * (1 - gamma)
    out[:, np.isnan(ordered[:, -1])] = math.nan  # NaN sorts last
    return out


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray) -> dict[float, float]:
    """TPR of pooled scores at each of :data:`~fesmia_hooks.report.TPR_FPRS` (ties as sklearn).

    A rate finer than one non-member (``0 < fpr < 1 / len(non_members)``) reads NaN: with
    that few non-members it would be TPR at zero false positives under another name.

    Example:
        >>> out = tpr_at_fpr(np.array([3.0, 2.0, 0.5]), np.array([1.0, 0.0]))
        >>> out[0.0], out[0.05]
        (0.6666666666666666, nan)
    """
    m = members[np.isfinite(members)]
    nm = non_members[np.isfinite(non_members)]
    if len(m) == 0 or len(nm) == 0:
        return {f: math.nan for f in TPR_FPRS}
    thresholds = np.unique(np.concatenate([m, nm]))
    # counts at or above each distinct score, all thresholds at once
    tpr = (len(m) - np.searchsorted(np.sort(m), thresholds, side="left")) / len(m)
    fpr = (len(nm) - np.searchsorted(np.sort(nm), thresholds, side="left")) / len(nm)
    out = {}
    for f in TPR_FPRS:
        if 0 < f < 1 / len(nm):  # finer than one non-member: the pool cannot resolve it
            out[f] = math.nan
            continue
        ok = fpr <= f + 1e-12
        out[f] = float(tpr[ok].max()) if ok.any() else 0.0
    return out
