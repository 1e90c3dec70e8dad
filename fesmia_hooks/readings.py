"""What one ranking reads: members named at no (and at few) false positives, and the AUC.

:func:`row_readings` reads every row of a ``[G, n]`` score matrix -- one row per episode, of
the true labels and of every label permutation, so tens of thousands of rows per check. It
has two implementations that give identical results: a compiled loop (numba; sorting each
row once and walking it), used when numba is installed, and a pure-torch one
(:func:`row_readings_torch`), used otherwise and as the reference in the tests.

numba is the compiler because it installs from wheels with no compiler at install or run
time on Linux, macOS and Windows (x86-64 and arm64), releases the GIL, and is not tied to
torch's ABI; the kernels are compiled on first use and cached.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from fesmia_hooks.logmia import auc_float64, tp_at_fp_limits

__all__ = ["HAVE_NUMBA", "row_readings", "row_readings_torch"]

#: Whether the compiled implementation is available (numba is imported on first use only).
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def row_readings_torch(
    scores: torch.Tensor, is_member: torch.Tensor, relaxed_fp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference implementation of :func:`row_readings`, in torch (any device)."""
    tp0, tpk = tp_at_fp_limits(scores, is_member, (0, relaxed_fp))
    return tp0.to(torch.int64), tpk.to(torch.int64), auc_float64(scores, is_member)


def _compiled() -> Any:
    """The numba kernel, compiled on first use (and cached on disk)."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def kernel(scores: Any, is_member: Any, relaxed_fp: int) -> Any:  # pragma: no cover
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
            if n <= 64:  # small rows (episodes): an insertion sort, no allocation
                for i in range(n):
                    j = i
                    while j > 0 and row[order[j - 1]] < row[i]:
                        order[j] = order[j - 1]
                        j -= 1
                    order[j] = i
            else:
                order[:] = np.argsort(-row, kind="mergesort")  # descending
            # Walk the ranking from the top, one run of equal scores at a time.
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
                # members above this run beat every non-member at or below it
                u += p * (n_neg - fp - q) + 0.5 * p * q
                if q > 0:
                    if tp_at0 < 0 and fp + q > 0:
                        tp_at0 = named
                    if tp_atk < 0 and fp + q > relaxed_fp:
                        tp_atk = named
                fp += q
                named += p
            tp0[r] = named if tp_at0 < 0 else tp_at0
            tpk[r] = named if tp_atk < 0 else tp_atk
            auc[r] = u / (n_pos * n_neg)
        return tp0, tpk, auc

    return kernel


_KERNEL: Any = None


def row_readings(
    scores: torch.Tensor, is_member: torch.Tensor, relaxed_fp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Members named with no false positive, with at most ``relaxed_fp``, and the AUC.

    A threshold names the members scoring strictly above it; ties move a member and a
    non-member together (as ``sklearn.metrics.roc_curve(drop_intermediate=False)``), so a
    member tied with the ``(k+1)``-th highest non-member is not named at ``FP <= k``. The
    AUC counts ties one half.

    Args:
        scores: ``[G, n]`` scores, higher meaning "more likely a member".
        is_member: ``[n]`` booleans, the same for every row.
        relaxed_fp: False positives the relaxed count allows.

    Returns:
        ``(tp_strict, tp_relaxed, auc)``, each ``[G]`` on ``scores``' device (counts as
        int64, AUC as float64).

    Raises:
        ProbeError: When a score is NaN or infinite.

    Example:
        >>> s = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.1, 0.1]])
        >>> tp0, tpk, auc = row_readings(s, torch.tensor([True, False, True, False]), 1)
        >>> tp0.tolist(), tpk.tolist(), auc.tolist()
        ([1, 0], [2, 1], [0.75, 0.5])
    """
    global _KERNEL
    if not bool(torch.isfinite(scores).all()):
        from fesmia_hooks.exceptions import ProbeError

        bad = int((~torch.isfinite(scores)).any(-1).sum())
        raise ProbeError(
            f"the learner gave non-finite scores (NaN or infinity) in {bad} of "
            f"{scores.shape[0]} rankings; a learner must return finite scores"
        )
    if not HAVE_NUMBA or scores.device.type != "cpu" or scores.shape[0] == 0:
        return row_readings_torch(scores, is_member, relaxed_fp)
    if _KERNEL is None:
        _KERNEL = _compiled()
    values = np.ascontiguousarray(scores.detach().to(torch.float64).numpy())
    tp0, tpk, auc = _KERNEL(values, is_member.cpu().numpy().astype(np.bool_), int(relaxed_fp))
    return torch.from_numpy(tp0), torch.from_numpy(tpk), torch.from_numpy(auc)
