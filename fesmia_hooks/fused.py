"""The default attack's inner loop, fused: SimpleShot scored and read per episode.

A check solves ``E`` episodes under the true labels and under each of ``B`` label
permutations (``E * (B + 1)`` episodes, ~100,000 by default), then a few thousand more in
half-pools for the interval. :func:`simpleshot_readings` runs them all through **one**
implementation, so ties and rounding cannot differ between the observed statistic and its
null:

* compiled (numba, :mod:`fesmia_hooks._kernels`) when numba is installed: one pass per
  episode that gathers the support, forms the two centroids, scores the queries and reads
  the ranking, with no intermediate tensor and without holding the GIL (the permutations
  are split over as many threads as torch uses, ``torch.get_num_threads()``: while a
  check runs synchronously, training's threads are idle);
* otherwise a torch reference (:func:`simpleshot_readings_torch`) that performs the same
  float64 operations in the same order, so both give identical readings (a test compares
  them on many seeds, tie-heavy features included).

Other learners (LaplacianShot, fine-tuning, the threshold baseline, your own) score
episodes in batches and are read by :func:`fesmia_hooks.readings.row_readings`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fesmia_hooks.exceptions import ProbeError
from fesmia_hooks.learners import simpleshot_rows
from fesmia_hooks.readings import HAVE_NUMBA, row_readings

__all__ = [
    "EpisodeReadings",
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
    # |score| <= 2 |q| |c_m - c_n| + |c_n|^2 + |c_m|^2 <= 8 F max|x|^2, and a pooled total
    # sums at most E of them: all finite while max|x| < 1e150 / F (E, F < 1e7)
    args += (not float(np.abs(x).max(initial=0.0)) < _NO_OVERFLOW / max(1, x.shape[1]),)
    from fesmia_hooks import _kernels

    rows = args[2].shape[0]
    limit = getattr(_LOCAL, "threads", None)
    threads = min(torch.get_num_threads() if limit is None else limit, rows // _ROWS_PER_THREAD)
    if threads <= 1:
        parts = [_kernels.simpleshot_episodes(*args)]
    else:  # the kernel releases the GIL: permutations split over torch's threads
        bounds = np.linspace(0, rows, threads + 1).astype(int)
        with ThreadPoolExecutor(threads, thread_name_prefix="fesmia-hooks-null") as pool:
            parts = list(pool.map(
                lambda lo_hi: _kernels.simpleshot_episodes(
                    *args[:2], args[2][lo_hi[0]:lo_hi[1]], *args[3:]),
                zip(bounds[:-1], bounds[1:], strict=True)))
    broken = sum(int(p[5]) for p in parts)
    if broken:
        raise ProbeError(
            f"the canary features give non-finite scores (NaN or infinity) for {broken} "
            f"queries: features this large overflow the learner; rescale them"
        )
    tp0, tpk, auc, pooled_auc, scores = (np.concatenate([p[i] for p in parts])
                                         for i in range(5))
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
