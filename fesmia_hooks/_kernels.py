"""Compiled loops of the attack (numba), imported only when numba is installed.

Three kernels share one reading of a ranking (:func:`read_row`, :func:`read_split`):

* :func:`row_readings` reads every row of a ready score matrix (any learner);
* :func:`centroid_readings` scores the whole pool against its two class centroids (each
  canary left out of its own) under each label permutation and reads that ranking (the
  default alarm's statistics);
* :func:`simpleshot_episodes` is the whole inner loop of the default attack, fused: for each
  label permutation and each episode it gathers the support, forms the two centroids,
  scores the queries and reads the ranking, without building any intermediate tensor. The
  observed episodes are the identity permutation of the same loop, so ties and rounding
  cannot differ between the observed statistic and its null.

The arithmetic is float64 in a fixed order (sums over shots, then over features, left to
right, no fused multiply-add), the order :mod:`fesmia_hooks.fused`'s torch reference
follows, so both give bit-identical scores. Every function releases the GIL and is cached
on disk after its first compilation.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["centroid_readings", "read_row", "row_readings", "simpleshot_episodes"]


def _jit(**options: Any) -> Any:
    """``numba.njit`` without the GIL, with numpy's error model, cached on disk where it can.

    With no writable cache location (a read-only install, no home folder) the kernels are
    compiled anew in each process instead of failing.
    """

    def decorate(fn: Any) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, error_model="numpy", **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, error_model="numpy", **options)(fn)

    return decorate


@_jit(inline="always")
def read_row(  # pragma: no cover
    row: Any, order: Any, is_member: Any, n_neg: int, relaxed_fp: int
) -> Any:
    """``(tp at 0 FP, tp at <= relaxed_fp FP, Mann-Whitney U)`` of one row of scores.

    ``order`` holds a descending order of ``row``; ties are walked as one run.
    """
    n = row.shape[0]
    fp = 0
    named = 0
    tp_at0 = -1
    tp_atk = -1
    u = 0.0
    i = 0
    while i < n:
        v = row[order[i]]
        p = 0
        q = 0
        while i < n and row[order[i]] == v:
            if is_member[order[i]]:
                p += 1
            else:
                q += 1
            i += 1
        # members in this run beat every non-member below it and tie those in it
        u += p * (n_neg - fp - q) + 0.5 * p * q
        if q > 0:
            if tp_at0 < 0:
                tp_at0 = named
            if tp_atk < 0 and fp + q > relaxed_fp:
                tp_atk = named
        fp += q
        named += p
    if tp_at0 < 0:
        tp_at0 = named
    if tp_atk < 0:
        tp_atk = named
    return tp_at0, tp_atk, u


@_jit(inline="always")
def sort_descending(row: Any, order: Any) -> None:  # pragma: no cover
    """Fill ``order`` with a descending order of ``row`` (insertion sort: short rows)."""
    n = row.shape[0]
    for i in range(n):
        j = i
        while j > 0 and row[order[j - 1]] < row[i]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i


@_jit(inline="always")
def read_split(  # pragma: no cover
    members: Any, non_members: Any, n_neg: int, relaxed_fp: int
) -> Any:
    """:func:`read_row` without sorting: the same three numbers, from the two sides' scores.

    A member is named at ``FP <= k`` when at most ``k`` non-members score at or above it
    (so a member tied with the ``(k+1)``-th highest non-member is not named); ``U`` counts
    every member/non-member pair, ties one half. Integer counts only: the loop vectorises.
    ``non_members`` may be padded with ``-inf`` past its first ``n_neg`` scores (a length
    that is a multiple of 4 vectorises without a remainder).
    """
    width = non_members.shape[0]
    tp0 = 0
    tpk = 0
    twice_u = 0
    for i in range(members.shape[0]):
        m = members[i]
        at_or_above = 0
        tied = 0
        for j in range(width):
            v = non_members[j]
            at_or_above += v >= m
            tied += v == m
        tp0 += at_or_above == 0
        tpk += at_or_above <= relaxed_fp
        twice_u += 2 * (n_neg - at_or_above) + tied
    return tp0, tpk, 0.5 * twice_u


@_jit(inline="always")
def read_named(  # pragma: no cover
    members: Any, non_members: Any, n_neg: int, relaxed_fp: int, top: Any
) -> Any:
    """:func:`read_split`'s two counts without the AUC: ``O(n (k + 1))``, not ``O(m n)``.

    A member is named at ``FP <= k`` when it scores above the ``(k+1)``-th highest
    non-member (any member, when there are no more than ``k`` of them). ``top`` is scratch
    of length ``min(relaxed_fp, n_neg) + 1``.
    """
    kept = min(relaxed_fp, n_neg) + 1  # more than n_neg: every member is named
    for j in range(kept):
        top[j] = -np.inf
    for j in range(n_neg):  # the kept highest non-member scores, descending
        v = non_members[j]
        if v > top[kept - 1]:
            i = kept - 1
            while i > 0 and top[i - 1] < v:
                top[i] = top[i - 1]
                i -= 1
            top[i] = v
    tp0 = 0
    tpk = 0
    for i in range(members.shape[0]):
        tp0 += members[i] > top[0]
        tpk += members[i] > top[kept - 1]
    return tp0, tpk


@_jit()
def row_readings(scores: Any, is_member: Any, relaxed_fp: int) -> Any:  # pragma: no cover
    """:func:`read_row` of every row of ``scores`` (``[G, n]`` float64)."""
    g, n = scores.shape
    tp0 = np.empty(g, np.int64)
    tpk = np.empty(g, np.int64)
    auc = np.empty(g, np.float64)
    n_pos = 0
    for j in range(n):
        if is_member[j]:
            n_pos += 1
    n_neg = n - n_pos
    order = np.empty(n, np.int64)
    for r in range(g):
        row = scores[r]
        if n <= 64:
            sort_descending(row, order)
        else:
            order[:] = np.argsort(-row, kind="mergesort")
        a, b, u = read_row(row, order, is_member, n_neg, relaxed_fp)
        tp0[r] = a
        tpk[r] = b
        auc[r] = u / (n_pos * n_neg)
    return tp0, tpk, auc


@_jit(inline="always")
def _pool_score(  # pragma: no cover
    features: Any, r: int, total_m: Any, total_n: Any, mean_m: Any, mean_n: Any,
    inv_m: float, inv_n: float, member: bool,
) -> float:
    """``d_n^2 - d_m^2`` of canary ``r``, its own class's centroid taken without it.

    ``inv_m`` and ``inv_n`` are ``1 / (count - 1)`` of each class (a product, not a
    division per canary: the reference multiplies alike).
    """
    near_n = 0.0
    near_m = 0.0
    for f in range(features.shape[1]):
        x = features[r, f]
        if member:
            dn = x - mean_n[f]
            dm = x - (total_m[f] - x) * inv_m
        else:
            dn = x - (total_n[f] - x) * inv_n
            dm = x - mean_m[f]
        if f == 0:
            near_n = dn * dn
            near_m = dm * dm
        else:
            near_n = near_n + dn * dn
            near_m = near_m + dm * dm
    return near_n - near_m


@_jit()
def centroid_readings(
    features: Any, perms: Any, num_members: int, relaxed_fp: int, careful: bool = True,
    with_auc: bool = True,
) -> Any:  # pragma: no cover
    """Nearest-centroid scores of the whole pool, leave-one-out, under every permutation.

    Under row ``b`` of ``perms``, slot ``i`` holds canary ``perms[b, i]`` and slots below
    ``num_members`` are the members. Each canary is scored ``d_n^2 - d_m^2``, its squared
    distances to the non-members' and the members' centroids, its own class's centroid
    taken without it (``(total - x) * (1 / (count - 1))``). Totals are summed over slots left to
    right, distances over features left to right: the order of
    :func:`fesmia_hooks.fused.centroid_readings_torch`.

    Returns:
        ``(tp0 [B], tpk [B], auc [B], non-finite scores)``: members scored above every
        non-member, above all but ``relaxed_fp`` of them, and the AUC (ties one half; NaN
        unless ``with_auc``, which costs ``O(m (n - m))`` per permutation).
    """
    n, width = features.shape
    b_count = perms.shape[0]
    m = num_members
    n_neg = n - m
    tp0 = np.empty(b_count, np.int64)
    tpk = np.empty(b_count, np.int64)
    auc = np.empty(b_count, np.float64)
    sided = np.full(m + 4 * ((n_neg + 3) // 4), -np.inf)  # see read_split
    member_scores = sided[:m]
    non_scores = sided[m:]
    total_m = np.empty(width, np.float64)
    total_n = np.empty(width, np.float64)
    mean_m = np.empty(width, np.float64)
    mean_n = np.empty(width, np.float64)
    inv_m = 1.0 / (m - 1)
    inv_n = 1.0 / (n_neg - 1)
    top = np.empty(min(relaxed_fp, n_neg) + 1, np.float64)
    broken = 0
    for b in range(b_count):
        perm = perms[b]
        for f in range(width):
            total_m[f] = features[perm[0], f]
            total_n[f] = features[perm[m], f]
        for i in range(1, m):
            r = perm[i]
            for f in range(width):
                total_m[f] = total_m[f] + features[r, f]
        for i in range(m + 1, n):
            r = perm[i]
            for f in range(width):
                total_n[f] = total_n[f] + features[r, f]
        for f in range(width):
            mean_m[f] = total_m[f] / m
            mean_n[f] = total_n[f] / n_neg
        for i in range(n):
            r = perm[i]
            own = i < m  # the canary's own class: its centroid is taken without it
            v = _pool_score(features, r, total_m, total_n, mean_m, mean_n, inv_m, inv_n, own)
            sided[i] = v
            if careful and not np.isfinite(v):
                broken += 1
        if with_auc:
            a, c, u = read_split(member_scores, non_scores, n_neg, relaxed_fp)
            auc[b] = u / (m * n_neg)
        else:
            a, c = read_named(member_scores, non_scores, n_neg, relaxed_fp, top)
            auc[b] = np.nan
        tp0[b] = a
        tpk[b] = c
    return tp0, tpk, auc, broken


@_jit()
def simpleshot_episodes(
    features: Any,
    slots: Any,
    perms: Any,
    is_query_member: Any,
    shots: int,
    relaxed_fp: int,
    num_members: int,
    pooled: bool,
    keep_scores: bool,
    careful: bool = True,
) -> Any:  # pragma: no cover
    """SimpleShot on every episode of every permutation, read as it is scored.

    Args:
        features: ``[n, F]`` float64 canary features.
        slots: ``[E, 2 * shots + Q]`` pool slots (support members, support non-members,
            query members, query non-members).
        perms: ``[B, n]``: under row ``b`` slot ``i`` holds canary ``perms[b, i]``.
        is_query_member: ``[Q]`` booleans of the query positions.
        shots: Support members (and non-members) per episode.
        relaxed_fp: False positives of the relaxed count.
        num_members: Slots below it are members (for the pooled AUC).
        pooled: Also read the pooled scores (each slot's mean over its query episodes).
        keep_scores: Return the ``[B, E, Q]`` scores (else an empty array).
        careful: Count non-finite scores (features too large can overflow them); the caller
            may skip it for features small enough that no score can overflow.

    Returns:
        ``(tp0 [B, E], tpk [B, E], auc [B, E], pooled_auc [B], scores, non-finite scores)``;
        the readings are meaningless when the last is not 0.
    """
    n, width = features.shape
    b_count = perms.shape[0]
    e_count, w = slots.shape
    s2 = 2 * shots
    q = w - s2
    n_pos = 0
    for j in range(q):
        if is_query_member[j]:
            n_pos += 1
    n_neg = q - n_pos
    tp0 = np.empty((b_count, e_count), np.int64)
    tpk = np.empty((b_count, e_count), np.int64)
    auc = np.empty((b_count, e_count), np.float64)
    pooled_auc = np.full(b_count, np.nan)
    scores_out = np.empty((b_count if keep_scores else 0, e_count, q), np.float64)
    by_side = np.empty(q, np.int64)  # query positions, the members' first
    a = 0
    for j in range(q):
        if is_query_member[j]:
            by_side[a] = j
            a += 1
    for j in range(q):
        if not is_query_member[j]:
            by_side[a] = j
            a += 1
    # one row of scores per episode, the members' then the non-members' (padded with -inf
    # to a multiple of 4: see read_split), and each query's pool slot in that order
    sided = np.full(n_pos + 4 * ((n_neg + 3) // 4), -np.inf)
    member_scores = sided[:n_pos]
    non_scores = sided[n_pos:]
    rows = np.empty((e_count, q), np.int64)
    for e in range(e_count):
        for t in range(q):
            rows[e, t] = slots[e, s2 + by_side[t]]
    # pooled scores: which slots are ever queried, and how often (the same for every b)
    count = np.zeros(n, np.float64)
    for e in range(e_count):
        for j in range(q):
            count[slots[e, s2 + j]] += 1.0
    seen_m = 0
    seen_n = 0
    for i in range(n):
        if count[i] > 0:
            if i < num_members:
                seen_m += 1
            else:
                seen_n += 1
    seen_members = np.empty(seen_m, np.int64)
    seen_non = np.empty(seen_n, np.int64)
    a = 0
    c = 0
    for i in range(n):
        if count[i] > 0:
            if i < num_members:
                seen_members[a] = i
                a += 1
            else:
                seen_non[c] = i
                c += 1
    total = np.zeros(n, np.float64)
    mean_m = np.empty(seen_m, np.float64)
    mean_n = np.empty(seen_n, np.float64)
    # The features as permutation b places them in the slots, padded with zero columns to a
    # multiple of 4 (adding +0.0 changes no sum) so that the loops below run in blocks of 4.
    wide = 4 * ((width + 3) // 4)
    x = np.zeros((n, wide), np.float64)
    diff = np.zeros(wide, np.float64)
    broken = 0
    for b in range(b_count):
        perm = perms[b]
        for i in range(n):
            for f in range(width):
                x[i, f] = features[perm[i], f]
        if pooled:
            total[:] = 0.0
        for e in range(e_count):
            # centroids, norms and their difference, 4 feature columns at a time
            bias = 0.0
            for c0 in range(0, wide, 4):
                r = slots[e, 0]
                m0, m1, m2, m3 = x[r, c0], x[r, c0 + 1], x[r, c0 + 2], x[r, c0 + 3]
                r = slots[e, shots]
                n0, n1, n2, n3 = x[r, c0], x[r, c0 + 1], x[r, c0 + 2], x[r, c0 + 3]
                for i in range(1, shots):
                    r = slots[e, i]
                    m0 = m0 + x[r, c0]
                    m1 = m1 + x[r, c0 + 1]
                    m2 = m2 + x[r, c0 + 2]
                    m3 = m3 + x[r, c0 + 3]
                    r = slots[e, shots + i]
                    n0 = n0 + x[r, c0]
                    n1 = n1 + x[r, c0 + 1]
                    n2 = n2 + x[r, c0 + 2]
                    n3 = n3 + x[r, c0 + 3]
                m0, m1, m2, m3 = m0 / shots, m1 / shots, m2 / shots, m3 / shots
                n0, n1, n2, n3 = n0 / shots, n1 / shots, n2 / shots, n3 / shots
                if c0 == 0:
                    norm_n = n0 * n0 + n1 * n1 + n2 * n2 + n3 * n3
                    norm_m = m0 * m0 + m1 * m1 + m2 * m2 + m3 * m3
                else:
                    norm_n = norm_n + n0 * n0 + n1 * n1 + n2 * n2 + n3 * n3
                    norm_m = norm_m + m0 * m0 + m1 * m1 + m2 * m2 + m3 * m3
                diff[c0], diff[c0 + 1] = m0 - n0, m1 - n1
                diff[c0 + 2], diff[c0 + 3] = m2 - n2, m3 - n3
                bias = norm_n - norm_m
            d0, d1, d2, d3 = diff[0], diff[1], diff[2], diff[3]
            for t in range(q):  # the query members first, then the non-members
                r = rows[e, t]
                dot = x[r, 0] * d0 + x[r, 1] * d1 + x[r, 2] * d2 + x[r, 3] * d3
                if wide > 4:
                    for c0 in range(4, wide, 4):
                        dot = (dot + x[r, c0] * diff[c0] + x[r, c0 + 1] * diff[c0 + 1]
                               + x[r, c0 + 2] * diff[c0 + 2] + x[r, c0 + 3] * diff[c0 + 3])
                v = 2.0 * dot + bias
                sided[t] = v
                if careful and not np.isfinite(v):
                    broken += 1  # overflow: the caller refuses the check
            a, c, u = read_split(member_scores, non_scores, n_neg, relaxed_fp)
            tp0[b, e] = a
            tpk[b, e] = c
            auc[b, e] = u / (n_pos * n_neg)
            if pooled:
                for t in range(q):
                    total[rows[e, t]] += sided[t]
            if keep_scores:
                for t in range(q):
                    scores_out[b, e, by_side[t]] = sided[t]
        if pooled and seen_m > 0 and seen_n > 0:
            for i in range(seen_m):
                mean_m[i] = total[seen_members[i]] / count[seen_members[i]]
                if careful and not np.isfinite(mean_m[i]):
                    broken += 1
            for i in range(seen_n):
                mean_n[i] = total[seen_non[i]] / count[seen_non[i]]
                if careful and not np.isfinite(mean_n[i]):
                    broken += 1
            _, _, u = read_split(mean_m, mean_n, seen_n, 0)
            pooled_auc[b] = u / (seen_m * seen_n)
    return tp0, tpk, auc, pooled_auc, scores_out, broken
