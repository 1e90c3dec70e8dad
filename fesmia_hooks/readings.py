"""What one ranking reads: members named at no (and at few) false positives, and the AUC.

:func:`row_readings` reads every row of a ``[G, n]`` score matrix -- one row per episode, of
the true labels and of every label permutation, so tens of thousands of rows per check. It
has two implementations that give identical results: a compiled loop (numba, in
:mod:`fesmia_hooks._kernels`; sorting each row once and walking it), used when numba is
installed, and a pure-torch one (:func:`row_readings_torch`), used otherwise and as the
reference in the tests. The default learner does not even build the score matrix: see
:mod:`fesmia_hooks.fused`.

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
    """The numba kernel (:mod:`fesmia_hooks._kernels`), compiled on first use, cached on disk."""
    from fesmia_hooks import _kernels

    return _kernels.row_readings


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
