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
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fesmia_hooks.report import TPR_FPRS, Readings

__all__ = ["Measurement", "mean_interval", "tpr_at_fpr"]


@dataclass(frozen=True)
class Measurement(Readings):
    """The readings of one check, with what the run-level test needs of it.

    Attributes:
        statistic: The run-level test's statistic (higher = more leakage).
        null: ``[B]`` the statistic under each of the probe's fixed label permutations, in
            the same order at every check.
    """

    statistic: float
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

    def readings(self) -> dict[str, Any]:
        """Every field but the test's statistic and null, by name (a report's readings)."""
        skip = ("statistic", "null")
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


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray) -> dict[float, float]:
    """TPR of pooled scores at each of :data:`~fesmia_hooks.report.TPR_FPRS` (ties as sklearn).

    Example:
        >>> tpr_at_fpr(np.array([3.0, 2.0, 0.5]), np.array([1.0, 0.0]))[0.01]
        0.6666666666666666
    """
    m = members[np.isfinite(members)]
    nm = non_members[np.isfinite(non_members)]
    if len(m) == 0 or len(nm) == 0:
        return {f: math.nan for f in TPR_FPRS}
    thresholds = np.unique(np.concatenate([m, nm]))[::-1]
    tpr = np.array([(m >= t).mean() for t in thresholds])
    fpr = np.array([(nm >= t).mean() for t in thresholds])
    out = {}
    for f in TPR_FPRS:
        ok = fpr <= f + 1e-12
        out[f] = float(tpr[ok].max()) if ok.any() else 0.0
    return out
