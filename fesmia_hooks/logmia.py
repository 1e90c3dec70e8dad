"""The Log-MIA measure, its exact chance level, and ROC helpers.

Log-MIA (Jiménez-López et al., 2025) reads membership inference at (near) zero false
positives on a log scale. With ``N`` members among ``d`` scored samples, ``TP`` and ``FP``
counted along the ROC curve (one point per distinct score, ties never broken by position):

* ``strict  = log(max TP at FP = 0 + 1) / log(N + 1)``
* ``relaxed = log(max TP at FP <= ceil(ln d) + 1) / log(N + 1)``

A random attack does not score 0: :func:`chance_log_mia` gives the exact expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fesmia_hooks.exceptions import ConfigurationError

__all__ = [
    "LogMIA",
    "auc_float64",
    "batched_tp_counts",
    "chance_counts",
    "chance_log_mia",
    "log_mia",
    "relaxed_false_positives",
    "roc_counts",
    "tp_at_fp_limits",
]


@dataclass(frozen=True)
class LogMIA:
    """A pair of Log-MIA values, both in [0, 1].

    Attributes:
        strict: Members named with no false positive, on the log scale.
        relaxed: Members named with at most ``ceil(ln d)`` false positives, on the log scale.
    """

    strict: float
    relaxed: float


def relaxed_false_positives(total: int) -> int:
    """Number of false positives the relaxed Log-MIA allows among ``total`` scored samples.

    Example:
        >>> relaxed_false_positives(30)
        4
    """
    if total < 2:
        raise ConfigurationError(f"`total` must be at least 2, got {total}")
    return math.ceil(math.log(total))


def _as_1d_tensor(name: str, values: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        t = values.detach()
    else:
        t = torch.as_tensor(np.ascontiguousarray(values))
    if t.dim() != 1:
        raise ConfigurationError(f"`{name}` must be one-dimensional, got shape {tuple(t.shape)}")
    return t.to(dtype)


def tp_at_fp_limits(
    scores: torch.Tensor, is_member: torch.Tensor, limits: tuple[int, ...]
) -> list[torch.Tensor]:
    """Max true positives at ``FP <= limit`` for each row of ``scores`` (``[G, n]``).

    ``is_member`` is ``[n]`` booleans shared by all rows. With ROC points at the end of each
    run of equal scores (as ``sklearn.metrics.roc_curve(drop_intermediate=False)`` places
    them), the best threshold that admits at most ``k`` false positives lies just above the
    ``(k+1)``-th highest non-member score ``v``; it names every member scoring strictly above
    ``v``. A member tied with ``v`` is not named: a tie moves TP and FP together.
    """
    pos = scores[..., is_member]
    neg = scores[..., ~is_member]
    top = max(limits) + 1
    available = min(top, neg.shape[-1])
    cut = neg.topk(available, dim=-1).values
    out = []
    for limit in limits:
        if limit >= neg.shape[-1]:
            out.append(torch.full(scores.shape[:-1], pos.shape[-1], device=scores.device))
        else:
            out.append((pos > cut[..., limit : limit + 1]).sum(-1))
    return out


def batched_tp_counts(
    scores: torch.Tensor, is_member: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members named with no false positive, and with at most ``ceil(ln d)``, per row.

    Args:
        scores: ``[G, n]`` attack scores, higher meaning "more likely a member".
        is_member: ``[n]`` booleans, the same for every row.

    Returns:
        ``(tp_strict, tp_relaxed)``, each ``[G]`` integer counts.

    Example:
        >>> s = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
        >>> [t.tolist() for t in batched_tp_counts(s, torch.tensor([True, False, True, False]))]
        [[1], [2]]
    """
    k = relaxed_false_positives(scores.shape[-1])
    tp0, tpk = tp_at_fp_limits(scores, is_member, (0, k))
    return tp0, tpk


def batched_log_mia(
    scores: torch.Tensor, is_member: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strict and relaxed Log-MIA of every row of ``scores``, as tensors on its device.

    Args:
        scores: ``[G, n]`` attack scores, higher meaning "more likely a member".
        is_member: ``[n]`` booleans, the same for every row.

    Returns:
        ``(strict, relaxed)``, each ``[G]`` float32.
    """
    n_members = int(is_member.sum())
    tp0, tpk = batched_tp_counts(scores, is_member)
    denom = math.log(n_members + 1)
    strict = torch.log1p(tp0.to(torch.float32)) / denom
    relaxed = torch.log1p(tpk.to(torch.float32)) / denom
    return strict, relaxed


def _check_scores(scores: Any, is_member: Any) -> tuple[torch.Tensor, torch.Tensor]:
    s = _as_1d_tensor("scores", scores, torch.float64)
    m = _as_1d_tensor("is_member", is_member, torch.bool)
    if s.shape != m.shape:
        raise ConfigurationError(
            f"`scores` and `is_member` must have the same length, got {s.numel()} and {m.numel()}"
        )
    if not torch.isfinite(s).all():
        raise ConfigurationError("`scores` must be finite, got NaN or infinite values")
    n_members = int(m.sum())
    if n_members == 0 or n_members == m.numel():
        raise ConfigurationError(
            "`is_member` must hold at least one member and one non-member, "
            f"got {n_members} members among {m.numel()} samples"
        )
    return s, m


def log_mia(scores: Any, is_member: Any) -> LogMIA:
    """Log-MIA of one set of attack scores.

    Args:
        scores: 1-D attack scores (tensor, array or list), higher = more likely a member.
        is_member: 1-D booleans of the same length: the truth.

    Returns:
        The :class:`LogMIA` pair. ``N`` is the number of members; the relaxed value allows
        ``ceil(ln d)`` false positives where ``d`` is the number of samples.

    Raises:
        ConfigurationError: On shapes that disagree, non-finite scores, or a side left empty.

    Example:
        >>> r = log_mia([0.9, 0.8, 0.7, 0.1], [True, True, False, False])
        >>> r.strict, r.relaxed
        (1.0, 1.0)
        >>> log_mia([0.5, 0.5, 0.1, 0.1], [True, False, True, False]).strict
        0.0
    """
    s, m = _check_scores(scores, is_member)
    strict, relaxed = batched_log_mia(s[None, :], m)
    return LogMIA(strict=float(strict[0]), relaxed=float(relaxed[0]))


def roc_counts(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve as counts, one point per distinct score (plus the origin).

    Returns the same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``,
    as counts rather than rates.

    Returns:
        ``(fp, tp, thresholds)`` as numpy arrays; the first point is ``(0, 0, +inf)``.

    Example:
        >>> fp, tp, _ = roc_counts([3, 2, 2, 1], [1, 1, 0, 0])
        >>> fp.tolist(), tp.tolist()
        ([0, 0, 1, 2], [0, 1, 2, 2])
    """
    s, m = _check_scores(scores, is_member)
    order = torch.argsort(s, descending=True, stable=True)
    s_sorted, m_sorted = s[order], m[order]
    tp = torch.cumsum(m_sorted.to(torch.int64), 0)
    fp = torch.cumsum((~m_sorted).to(torch.int64), 0)
    end = torch.ones_like(m_sorted)
    end[:-1] = s_sorted[:-1] != s_sorted[1:]
    zero = torch.zeros(1, dtype=torch.int64)
    fp_out = torch.cat([zero, fp[end]]).numpy()
    tp_out = torch.cat([zero, tp[end]]).numpy()
    thr = np.concatenate([[np.inf], s_sorted[end].numpy()])
    return fp_out, tp_out, thr


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _tp_distribution(members: int, non_members: int, k: int) -> list[float]:
    """P(T = t), t = 0..members: members ranked before the (k+1)-th non-member at random."""
    probs = []
    total = _log_comb(members + non_members, members)
    for t in range(members + 1):
        rest = members - t + non_members - k - 1
        if k >= non_members:
            # Fewer than k+1 non-members: every member is named.
            probs.append(1.0 if t == members else 0.0)
            continue
        if rest < members - t:
            probs.append(0.0)
            continue
        probs.append(math.exp(_log_comb(t + k, t) + _log_comb(rest, members - t) - total))
    return probs


def chance_log_mia(queries: int, non_members: int | None = None) -> LogMIA:
    """Exact expected Log-MIA of an attack that ranks at random.

    Uses the negative hypergeometric law of the number of members ranked before the
    ``(k+1)``-th non-member; nothing is simulated.

    Args:
        queries: Members in the query set (``N``).
        non_members: Non-members in the query set; defaults to ``queries``.

    Returns:
        The expected :class:`LogMIA` under random ranking.

    Example:
        >>> c = chance_log_mia(15)
        >>> round(c.strict, 4), round(c.relaxed, 4)
        (0.178, 0.5884)
    """
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ConfigurationError(f"`queries` must be a positive int, got {queries!r}")
    m = queries if non_members is None else non_members
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigurationError(f"`non_members` must be a positive int, got {non_members!r}")
    denom = math.log(queries + 1)
    k = relaxed_false_positives(queries + m)
    values = []
    for limit in (0, k):
        probs = _tp_distribution(queries, m, limit)
        values.append(sum(p * math.log(t + 1) for t, p in enumerate(probs)) / denom)
    return LogMIA(strict=values[0], relaxed=values[1])


def chance_counts(queries: int, non_members: int | None = None) -> tuple[float, float]:
    """Expected members a random ranking names, strictly and relaxed (exact).

    Strictly: with no false positive; relaxed: with at most ``ceil(ln d)``. The law is the
    one of :func:`chance_log_mia`. With ``N`` members and ``N`` non-members these are
    ``N / (N + 1)`` and ``N (k + 1) / (N + 1)``.

    Example:
        >>> [round(c, 4) for c in chance_counts(15)]
        [0.9375, 4.6875]
    """
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ConfigurationError(f"`queries` must be a positive int, got {queries!r}")
    m = queries if non_members is None else non_members
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigurationError(f"`non_members` must be a positive int, got {non_members!r}")
    k = relaxed_false_positives(queries + m)
    out = []
    for limit in (0, k):
        probs = _tp_distribution(queries, m, limit)
        out.append(sum(p * t for t, p in enumerate(probs)))
    return out[0], out[1]


def batched_auc(scores: torch.Tensor, is_member: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of every row (ties count one half), ``[G]`` float32.

    ``is_member`` is ``[n]`` booleans shared by all rows. Computed from ranks (the
    Mann-Whitney statistic, tied scores sharing their average rank), in
    ``O(n log n)`` per row.

    Example:
        >>> batched_auc(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), torch.tensor([1, 1, 0, 0]).bool())
        tensor([0.8750])
    """
    return auc_float64(scores, is_member).to(torch.float32)


def auc_float64(scores: torch.Tensor, is_member: torch.Tensor) -> torch.Tensor:
    """:func:`batched_auc` in float64: exact for every pool size this library meets."""
    ordered = scores.sort(-1).values
    low = torch.searchsorted(ordered, scores, right=False)
    high = torch.searchsorted(ordered, scores, right=True)
    ranks = (low + high + 1).to(torch.float64) / 2  # average 1-based rank of each score
    n_pos = int(is_member.sum())
    n_neg = is_member.numel() - n_pos
    u = ranks[..., is_member].sum(-1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
