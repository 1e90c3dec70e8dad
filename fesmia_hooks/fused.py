"""The attack's compiled loops: SimpleShot per episode, and the whole pool's ranking.

A check solves its ``E`` episodes under the true labels, then a few thousand more in
half-pools for the interval; an alarm on an episode statistic solves them again under each
of the ``B`` label permutations (``E * (B + 1)`` episodes, ~100,000). The default alarm
reads the whole pool's leave-one-out nearest-centroid ranking instead
(:func:`centroid_readings`): one ranking of ``n`` canaries per permutation.
:func:`simpleshot_readings` runs every episode, observed or permuted, through **one**
implementation, so ties and rounding cannot differ between an observed statistic and its
null; :func:`centroid_readings` likewise. Each is:

* compiled (numba, :mod:`fesmia_hooks._kernels`) when numba is installed: one pass per
  episode (or labeling) with no intermediate tensor and without holding the GIL (the
  permutations are split over as many threads as torch uses, ``torch.get_num_threads()``:
  while a check runs synchronously, training's threads are idle);
* otherwise a torch reference (:func:`simpleshot_readings_torch`,
  :func:`centroid_readings_torch`) that performs the same float64 operations in the same
  order, so both give identical readings (tests compare them on many seeds, tie-heavy
  features included).

Other learners (LaplacianShot, fine-tuning, the threshold baseline, your own) score
episodes in batches and are read by :func:`fesmia_hooks.readings.row_readings`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fesmia_hooks._validation import positive_int
from fesmia_hooks.exceptions import ProbeError
from fesmia_hooks.learners import simpleshot_rows
from fesmia_hooks.readings import HAVE_NUMBA, row_readings

__all__ = [
    "EpisodeReadings",
    "PoolReadings",
    "centroid_readings",
    "centroid_readings_torch",
    "signal_mean_differences",
    "host_features",
    "simpleshot_readings",
    "simpleshot_readings_torch",
    "threads_at_most",
]

# Episode rows per block of the torch reference ([rows, width, F] float64 gathered at once).
_BLOCK_ROWS = 20_000
# Fewest permutations worth a thread of their own.
_ROWS_PER_THREAD = 128
# Features below this (over F) cannot overflow a SimpleShot score: no need to test each one.
_NO_OVERFLOW = 1e150


_LOCAL = threading.local()


@contextlib.contextmanager
def threads_at_most(threads: int) -> Iterator[None]:
    """Split the permutations over at most ``threads`` threads inside this block (this thread).

    An attack running beside training (``PrivacyMonitor(asynchronous=True)``) takes one
    core and leaves torch's threads to training.

    Example:
        >>> with threads_at_most(1):
        ...     pass
    """
    before = getattr(_LOCAL, "threads", None)
    _LOCAL.threads = max(1, int(threads))
    try:
        yield
    finally:
        _LOCAL.threads = before


@dataclass(frozen=True)
class EpisodeReadings:
    """What the attack reads from ``B`` groups of ``E`` episodes.

    Attributes:
        tp_strict: ``[B, E]`` query members named with no false positive.
        tp_relaxed: ``[B, E]`` the same with the relaxed allowance of false positives.
        auc: ``[B, E]`` episode AUC.
        pooled_auc: ``[B]`` AUC of each slot's mean score over its query episodes (NaN when
            not asked for).
        scores: ``[B, E, Q]`` query scores when asked for, else ``None``.
    """

    tp_strict: np.ndarray
    tp_relaxed: np.ndarray
    auc: np.ndarray
    pooled_auc: np.ndarray
    scores: np.ndarray | None = None


def simpleshot_readings(
    features: torch.Tensor | np.ndarray,
    slots: np.ndarray,
    perms: np.ndarray,
    is_query_member: np.ndarray,
    *,
    shots: int,
    relaxed_fp: int,
    num_members: int,
    pooled: bool = True,
    keep_scores: bool = False,
) -> EpisodeReadings:
    """SimpleShot on every episode of every permutation, each ranking read on the way.

    Args:
        features: ``[n, F]`` canary features, on any device (copied to the host once, as
            float64).
        slots: ``[E, 2 * shots + Q]`` int64 pool slots per episode (support members, support
            non-members, query members, query non-members).
        perms: ``[B, n]`` int64; under row ``b``, slot ``i`` holds canary ``perms[b, i]``
            (the identity row reads the true labels).
        is_query_member: ``[Q]`` booleans of the query positions.
        shots: Support members (and non-members) per episode.
        relaxed_fp: False positives the relaxed count allows.
        num_members: Slots below it hold members.
        pooled: Also compute the pooled AUC of each row.
        keep_scores: Also return the query scores.

    Returns:
        The :class:`EpisodeReadings`.

    Raises:
        ProbeError: When a feature is NaN or infinite.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> feats = torch.randn(8, 2, generator=g)
        >>> slots = np.array([[0, 4, 1, 2, 5, 6], [1, 5, 2, 3, 6, 7]])
        >>> perms = np.stack([np.arange(8), np.arange(8)[::-1]])
        >>> flags = np.array([True, True, False, False])
        >>> out = simpleshot_readings(feats, slots, perms, flags, shots=1, relaxed_fp=1,
        ...                           num_members=4)
        >>> out.auc.shape, out.pooled_auc.shape
        ((2, 2), (2,))
    """
    x = host_features(features)
    args = (x, np.ascontiguousarray(slots, np.int64), np.ascontiguousarray(perms, np.int64),
            np.ascontiguousarray(is_query_member, np.bool_), int(shots), int(relaxed_fp),
            int(num_members), bool(pooled), bool(keep_scores))
    if not HAVE_NUMBA:
        return simpleshot_readings_torch(*args)
    args += (_may_overflow(x),)
    from fesmia_hooks import _kernels

    parts = _over_threads(lambda rows: _kernels.simpleshot_episodes(*args[:2], rows, *args[3:]),
                          args[2])
    broken = sum(int(p[5]) for p in parts)
    if broken:
        raise _overflow(broken, "queries")
    tp0, tpk, auc, pooled_auc, scores = (_joined(parts, i) for i in range(5))
    return EpisodeReadings(tp0, tpk, auc, pooled_auc, scores if keep_scores else None)


def simpleshot_readings_torch(
    features: np.ndarray,
    slots: np.ndarray,
    perms: np.ndarray,
    is_query_member: np.ndarray,
    shots: int,
    relaxed_fp: int,
    num_members: int,
    pooled: bool = True,
    keep_scores: bool = False,
) -> EpisodeReadings:
    """The reference of :func:`simpleshot_readings`: the same float64 operations, in torch."""
    x = torch.from_numpy(np.ascontiguousarray(features, np.float64))
    slot_t = torch.from_numpy(np.ascontiguousarray(slots, np.int64))
    perm_t = torch.from_numpy(np.ascontiguousarray(perms, np.int64))
    flags = torch.from_numpy(np.ascontiguousarray(is_query_member, np.bool_))
    b_count, n = perm_t.shape
    e_count, width = slot_t.shape
    s2 = 2 * shots
    q = width - s2
    per_block = max(1, _BLOCK_ROWS // max(e_count, 1))
    parts: list[tuple[torch.Tensor, ...]] = []
    kept: list[torch.Tensor] = []
    query_slots = slot_t[:, s2:].reshape(-1)
    count = torch.bincount(query_slots, minlength=n).to(torch.float64)
    seen = count > 0
    seen_member = (torch.arange(n) < num_members)[seen]
    for start in range(0, b_count, per_block):
        block = perm_t[start : start + per_block]  # [b, n]
        rows = x[block[:, slot_t]]  # [b, E, width, F]
        scores = simpleshot_rows(rows, shots)  # [b, E, Q]
        tp0, tpk, auc = row_readings(scores.reshape(-1, q), flags, relaxed_fp)
        shape = (block.shape[0], e_count)
        pooled_auc = torch.full((block.shape[0],), float("nan"), dtype=torch.float64)
        if pooled and 0 < int(seen_member.sum()) < int(seen.sum()):
            total = torch.zeros(block.shape[0], n, dtype=torch.float64)
            for e in range(e_count):  # episode by episode, as the compiled loop adds them
                total[:, slot_t[e, s2:]] += scores[:, e]
            _, _, pooled_auc = row_readings(total[:, seen] / count[seen], seen_member, 0)
        parts.append((tp0.reshape(shape), tpk.reshape(shape), auc.reshape(shape), pooled_auc))
        if keep_scores:
            kept.append(scores)
    tp0, tpk, auc, pooled_auc = (torch.cat([p[i] for p in parts]).numpy() for i in range(4))
    return EpisodeReadings(tp0, tpk, auc, pooled_auc,
                           torch.cat(kept).numpy() if keep_scores else None)


def _over_threads(kernel: Callable[[np.ndarray], tuple], perms: np.ndarray) -> list[tuple]:
    """Each block's outputs of ``kernel`` on the permutations' rows, split over threads.

    As many threads as torch uses (or the limit of :func:`threads_at_most`), each with at
    least ``_ROWS_PER_THREAD`` rows; the kernels release the GIL.
    """
    rows = perms.shape[0]
    limit = getattr(_LOCAL, "threads", None)
    threads = min(torch.get_num_threads() if limit is None else limit, rows // _ROWS_PER_THREAD)
    if threads <= 1:
        return [kernel(perms)]
    bounds = np.linspace(0, rows, threads + 1).astype(int)
    with ThreadPoolExecutor(threads, thread_name_prefix="fesmia-hooks-null") as pool:
        return list(pool.map(lambda lo_hi: kernel(perms[lo_hi[0]:lo_hi[1]]),
                             zip(bounds[:-1], bounds[1:], strict=True)))


def _may_overflow(x: np.ndarray) -> bool:
    """Whether a score of features ``x`` may overflow (so each must be tested).

    An episode's score is at most ``2 |q| |c_m - c_n| + |c_n|^2 + |c_m|^2 <= 8 F max|x|^2``
    (a pool's leave-one-out score likewise), and a pooled total sums at most ``E`` of them:
    all finite while ``max|x| < 1e150 / F`` (``E, F < 1e7``).
    """
    return not float(np.abs(x).max(initial=0.0)) < _NO_OVERFLOW / max(1, x.shape[1])


def _overflow(count: int, what: str) -> ProbeError:
    """The error for ``count`` non-finite scores of ``what`` (queries, canaries)."""
    return ProbeError(
        f"the canary features give non-finite scores (NaN or infinity) for {count} {what}: "
        "features this large overflow the learner; rescale them"
    )


def _joined(parts: list[tuple], i: int) -> np.ndarray:
    """Output ``i`` of every block, joined (no copy for a single block)."""
    return parts[0][i] if len(parts) == 1 else np.concatenate([p[i] for p in parts])


@dataclass(frozen=True)
class PoolReadings:
    """What the whole pool's nearest-centroid ranking reads, under ``G`` labelings.

    Attributes:
        tp_strict: ``[G]`` members scored above every non-member.
        tp_relaxed: ``[G]`` members scored above all but the relaxed allowance of them.
        auc: ``[G]`` the AUC of members against non-members (ties one half).
    """

    tp_strict: np.ndarray
    tp_relaxed: np.ndarray
    auc: np.ndarray


def centroid_readings(
    features: torch.Tensor | np.ndarray,
    perms: np.ndarray,
    *,
    num_members: int,
    relaxed_fp: int,
    with_auc: bool = True,
) -> PoolReadings:
    """The whole pool ranked by its nearest-centroid scores, under each row of ``perms``.

    Each canary is scored by SimpleShot with every other canary as support: ``d_n^2 -
    d_m^2``, its squared distances to the two class centroids, its own class's centroid
    taken without it (leave-one-out). The test statistics of the default alarm read this
    ranking; it costs ``O(n F + m (n - m))`` per labeling, not ``E`` episodes.

    Args:
        features: ``[n, F]`` canary features, on any device (copied to the host once).
        perms: ``[G, n]`` int64; under row ``g``, slot ``i`` holds canary ``perms[g, i]``
            and slots below ``num_members`` are members (the identity row: the true labels).
        num_members: Member slots (at least 2, and at least 2 non-member slots).
        relaxed_fp: False positives the relaxed count allows.
        with_auc: Whether to read the AUC too (``O(m (n - m))`` per labeling rather than
            ``O(n)``); without it the AUCs are NaN.

    Returns:
        The :class:`PoolReadings`.

    Raises:
        ProbeError: When a feature is NaN or infinite, or the scores overflow.

    Example:
        >>> x = torch.tensor([[3.0], [2.0], [0.0], [-1.0]])
        >>> out = centroid_readings(x, np.array([[0, 1, 2, 3], [0, 2, 1, 3]]), num_members=2,
        ...                         relaxed_fp=0)
        >>> out.tp_strict.tolist(), out.auc.tolist()
        ([2, 0], [1.0, 0.0])
    """
    relaxed_fp = positive_int("relaxed_fp", relaxed_fp, minimum=0)
    x = host_features(features)
    perms = np.ascontiguousarray(perms, np.int64)
    n = x.shape[0]
    if not 2 <= num_members <= n - 2:
        raise ProbeError(f"the pool's centroids need at least 2 members and 2 non-members, "
                         f"got {num_members} of {n} canaries as members")
    if not HAVE_NUMBA:
        return centroid_readings_torch(x, perms, num_members, relaxed_fp, with_auc=with_auc)
    from fesmia_hooks import _kernels

    careful = _may_overflow(x)
    parts = _over_threads(
        lambda rows: _kernels.centroid_readings(x, rows, int(num_members), int(relaxed_fp),
                                                careful, bool(with_auc)), perms)
    broken = sum(int(p[3]) for p in parts)
    if broken:
        raise _overflow(broken, "canaries")
    return PoolReadings(*(_joined(parts, i) for i in range(3)))


def centroid_readings_torch(
    features: np.ndarray, perms: np.ndarray, num_members: int, relaxed_fp: int,
    *, with_auc: bool = True,
) -> PoolReadings:
    """The reference of :func:`centroid_readings`: the same float64 operations, in torch."""
    x = torch.from_numpy(np.ascontiguousarray(features, np.float64))
    perm_t = torch.from_numpy(np.ascontiguousarray(perms, np.int64))
    m = num_members
    n_neg = x.shape[0] - m
    out = []
    per_block = max(1, _BLOCK_ROWS // max(x.shape[0], 1))
    for start in range(0, perm_t.shape[0], per_block):
        rows = x[perm_t[start : start + per_block]]  # [g, n, F]
        total_m, total_n = rows[:, 0], rows[:, m]
        for i in range(1, m):  # slot by slot, as the compiled loop adds them
            total_m = total_m + rows[:, i]
        for i in range(m + 1, rows.shape[1]):
            total_n = total_n + rows[:, i]
        is_member = (torch.arange(rows.shape[1]) < m)[None, :, None]
        c_m = torch.where(is_member, (total_m[:, None] - rows) * (1.0 / (m - 1)),
                          (total_m / m)[:, None])
        c_n = torch.where(is_member, (total_n / n_neg)[:, None],
                          (total_n[:, None] - rows) * (1.0 / (n_neg - 1)))
        dn, dm = rows - c_n, rows - c_m
        near_n, near_m = dn[..., 0] * dn[..., 0], dm[..., 0] * dm[..., 0]
        for f in range(1, rows.shape[2]):
            near_n = near_n + dn[..., f] * dn[..., f]
            near_m = near_m + dm[..., f] * dm[..., f]
        out.append(near_n - near_m)  # [g, n], the members' slots first
    scores = torch.cat(out)
    if not bool(torch.isfinite(scores).all()):
        raise _overflow(int((~torch.isfinite(scores)).sum()), "canaries")
    tp0, tpk, auc = row_readings(scores, torch.arange(scores.shape[1]) < m, relaxed_fp)
    auc = auc.double().numpy() if with_auc else np.full(len(auc), np.nan)
    return PoolReadings(tp0.numpy(), tpk.numpy(), auc)


def signal_mean_differences(signals: np.ndarray, perms: np.ndarray, num_members: int) -> np.ndarray:
    """Members' mean minus non-members' mean of a label-free score, under each labeling.

    The score of a canary is the mean of its ``signals`` (standardised columns, each
    oriented "higher = more member-like"); it uses no label, so permuting the labels leaves
    it unchanged. Row ``g`` of ``perms`` puts canary ``perms[g, i]`` in slot ``i``, the
    members' slots first. One numpy expression computes every row alike, so the observed
    value (the identity row) and its null cannot differ in rounding.

    Args:
        signals: ``[n, k]`` oriented signal columns (``k >= 1``).
        perms: ``[G, n]`` labelings.
        num_members: Member slots.

    Returns:
        ``[G]`` float64 differences of means.

    Example:
        >>> x = np.array([[2.0], [1.0], [0.0], [-1.0]])
        >>> signal_mean_differences(x, np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), 2).tolist()
        [2.0, -2.0]
    """
    score = np.asarray(signals, dtype=np.float64).mean(axis=1)
    placed = score[np.asarray(perms, dtype=np.int64)]
    return placed[:, :num_members].mean(axis=1) - placed[:, num_members:].mean(axis=1)


def host_features(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """``features`` as a contiguous float64 host array (one copy from the device).

    Raises:
        ProbeError: When a feature is NaN or infinite.
    """
    if isinstance(features, torch.Tensor):
        x = features.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        x = np.asarray(features, dtype=np.float64)
    x = np.ascontiguousarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ProbeError(f"the canary features must be [canaries, F >= 1], got {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise ProbeError(
            f"the canary features hold NaN or infinite values in {bad} of {x.shape[0]} rows; "
            "the model's outputs (or a custom signal_fn) must be finite"
        )
    return x
