"""Alarms that keep their false-alarm rate per training run, not per check.

A monitor looks at the data every epoch; a 5 % test at each of 50 looks raises a false alarm
on most runs of a model that leaks nothing (``docs/science.md#run-level-test``). Under "no
leakage" the membership labels of the canary pool are exchangeable for the whole run, so the
probe's fixed set of ``B`` label permutations, reused at every check, gives ``B`` null
*trajectories* of the test statistic. :class:`SequentialTest` spends the run's error budget
``alpha`` over checks: at check ``c`` it picks the largest p-value threshold under which no
more than ``floor(S(c) * (B + 1))`` of the ``B + 1`` trajectories (the observed one and the
null ones, treated alike) have crossed *so far*, counting each trajectory once, at its first
crossing. The observed run alarms when its p-value is at or below that threshold. The
observed trajectory is exchangeable with the null ones when nothing leaks, so the chance
that it alarms at any check up to ``c`` is at most ``S(c) <= alpha``. Consecutive checks are
strongly correlated, so a null trajectory that crosses late has usually crossed before and
is not counted again: the correction costs little power.

At most ``alpha * (B + 1)`` trajectories can ever cross, so a check can raise an alarm only
when some of that allowance is left for it (:attr:`SequentialTest.could_alarm`). The
spending function is ``S(c) = alpha * min(1, c / horizon)`` when the number of checks is
known and the permutations allow one trajectory per expected check (``alpha * (B + 1) >=
horizon``); when they do not, ``S(c) = alpha * log(1 + c) / log(1 + horizon)``, which front-
loads the allowance so that early checks are not starved; and ``S(c) = alpha * c / (c + 10)``
when the number of checks is unknown (half of ``alpha`` by the tenth check, all of it only
in the limit). A probe with ``permutations="auto"`` draws enough permutations for the first
case (see :meth:`fesmia_hooks.Calibration.permutations_needed`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fesmia_hooks._validation import optional_positive_int, probability

__all__ = ["TIE", "SequentialTest", "observed_rank", "permutation_p_values", "ranked",
           "ranks_among"]


def permutation_p_values(observed: float, null: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Ranks of the observed and of every null statistic among all ``B + 1`` of them.

    A p-value is ``rank / (B + 1)`` where ``rank`` counts the statistics at least as large
    (the one itself included). Values within ``1e-6`` count as equal; a NaN statistic ranks
    below every other (it is no evidence of leakage: p-value 1).

    Returns:
        ``(observed_rank, null_ranks)``; ranks are ints in ``1 .. B + 1``.

    Example:
        >>> r, nr = permutation_p_values(0.9, torch.tensor([0.1, 0.5, 0.95]))
        >>> r, nr.tolist()
        (2, [4, 3, 1])
    """
    ranks = ranks_among(np.append(ranked(null), ranked(observed)))
    return int(ranks[-1]), torch.from_numpy(ranks[:-1])


def ranks_among(values: np.ndarray) -> np.ndarray:
    """Each value's rank among all of ``values``: how many are at least as large.

    Within :data:`TIE`, itself included; int64. Rank ``r`` of ``n`` is the p-value ``r / n``.

    Example:
        >>> ranks_among(np.array([0.9, 0.1, 0.9, 0.5])).tolist()
        [2, 4, 2, 3]
    """
    return values.size - np.searchsorted(np.sort(values), values - TIE, side="left")


def observed_rank(observed: float, null: torch.Tensor | np.ndarray) -> int:
    """The observed statistic's rank among all ``B + 1``: 1 + the null values at least as large.

    The first half of :func:`permutation_p_values`, for a check read on its own.

    Example:
        >>> observed_rank(0.9, torch.tensor([0.1, 0.5, 0.95]))
        2
        >>> observed_rank(float("nan"), torch.tensor([0.1, 0.5, 0.95]))  # p-value 1
        4
    """
    return 1 + int(np.count_nonzero(ranked(null) >= ranked(observed) - TIE))


#: Statistics within this of each other count as equal.
TIE = 1e-6


def ranked(statistics: float | torch.Tensor | np.ndarray) -> np.ndarray:
    """Statistics as a flat float64 host array for ranking, a NaN as ``-inf`` (ranked last).

    Example:
        >>> ranked(torch.tensor([0.5, float("nan")])).tolist()
        [0.5, -inf]
    """
    if isinstance(statistics, torch.Tensor):
        values = statistics.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        values = np.asarray(statistics, dtype=np.float64).reshape(-1)
    return np.where(np.isnan(values), -np.inf, values)


class SequentialTest:
    """Run-level calibrated significance over repeated checks (alpha spending on permutations).

    Args:
        alpha: The false-alarm rate allowed per training run.
        horizon: Expected number of checks in the run, when known.

    Example:
        >>> test = SequentialTest(alpha=0.05)
        >>> null = torch.linspace(0.0, 1.0, 999)
        >>> test.update(2.0, null)  # beyond every permutation: p = 1/1000
        (0.001, 0.004, True)
    """

    def __init__(self, alpha: float = 0.05, horizon: int | None = None) -> None:
        self.alpha = probability("alpha", alpha)
        self.horizon = optional_positive_int("horizon", horizon)
        self.checks = 0
        self._crossed: torch.Tensor | None = None
        #: Whether the latest check could have raised an alarm (some allowance was left).
        self.could_alarm = True

    def spent(self, check: int, permutations: int | None = None) -> float:
        """Share of ``alpha`` usable by check number ``check`` (1-based), with ``B`` permutations.

        Example:
            >>> test = SequentialTest(alpha=0.05, horizon=100)
            >>> round(test.spent(10, 1999), 4), round(test.spent(10, 499), 4)
            (0.005, 0.026)
        """
        if self.horizon is not None:
            tokens = self.alpha * ((permutations or 0) + 1)
            if permutations is None or tokens >= self.horizon:
                return self.alpha * min(1.0, check / self.horizon)
            return self.alpha * min(1.0, math.log1p(check) / math.log1p(self.horizon))
        return self.alpha * check / (check + 10)

    def update(self, observed: float, null: torch.Tensor) -> tuple[float, float, bool]:
        """Record one check.

        The rule treats the observed trajectory and the ``B`` null ones alike: a trajectory
        *crosses* at the first check where its rank falls within the threshold, and the
        threshold is the largest rank that keeps the number of crossed trajectories within
        ``floor(S(c) * (B + 1))``. Nothing distinguishes the observed trajectory when nothing
        leaks, so it crosses by check ``c`` with probability at most ``S(c)``.

        Args:
            observed: The observed statistic (higher = more leakage).
            null: ``[B]`` the statistic under each label permutation, same order every check.

        Returns:
            ``(p_value, p_threshold, significant)``.
        """
        b = int(null.numel())
        if self._crossed is None or self._crossed.numel() != b + 1:
            self._crossed = torch.zeros(b + 1, dtype=torch.bool)
        self.checks += 1
        obs_rank, null_ranks = permutation_p_values(observed, null)
        ranks = torch.cat([null_ranks, torch.tensor([obs_rank])])
        allowed = math.floor(self.spent(self.checks, b) * (b + 1) + 1e-9)
        remaining = allowed - int(self._crossed.sum())
        self.could_alarm = remaining >= 1 or bool(self._crossed[-1])
        # Largest rank r with #(open trajectories ranked <= r) <= remaining. With nothing
        # left to spend, r stops just above the best open trajectory: a trajectory that has
        # already crossed can still read as significant, and no new one crosses.
        counts = torch.bincount(ranks[~self._crossed], minlength=b + 2).cumsum(0)
        limit = int((counts <= max(remaining, 0)).nonzero().max())
        self._crossed |= ranks <= limit
        return obs_rank / (b + 1), limit / (b + 1), obs_rank <= limit

    def state_dict(self) -> dict[str, Any]:
        """Plain-value state: the check count and which null trajectories have crossed."""
        crossed = [] if self._crossed is None else self._crossed.nonzero().flatten().tolist()
        size = 0 if self._crossed is None else int(self._crossed.numel()) - 1
        return {"checks": self.checks, "crossed": crossed, "permutations": size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys keep their defaults)."""
        self.checks = int(state.get("checks", 0))
        size = int(state.get("permutations", 0))
        if size:
            self._crossed = torch.zeros(size + 1, dtype=torch.bool)
            self._crossed[torch.as_tensor(state.get("crossed", []), dtype=torch.long)] = True
        else:
            self._crossed = None
