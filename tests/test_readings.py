"""The compiled reading of rankings equals the torch reference, ties included."""

import pytest
import torch

from fesmia_hooks.readings import HAVE_NUMBA, row_readings, row_readings_torch


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("levels", [None, 2, 4, 9])
def test_compiled_and_reference_agree(seed, levels):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 40, (1,), generator=g))
    members = int(torch.randint(1, n, (1,), generator=g))
    scores = torch.randn(300, n, generator=g)
    if levels is not None:  # tie-heavy: few distinct values
        scores = torch.randint(0, levels, (300, n), generator=g).float()
    is_member = torch.zeros(n, dtype=torch.bool)
    is_member[torch.randperm(n, generator=g)[:members]] = True
    for k in (0, 1, 3, n):
        fast = row_readings(scores, is_member, k)
        slow = row_readings_torch(scores, is_member, k)
        for a, b in zip(fast, slow, strict=True):
            assert torch.equal(a.double(), b.double())


def test_sklearn_agrees_on_the_auc():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (20, 30), generator=g).float()
    is_member = torch.arange(30) < 15
    _, _, auc = row_readings(scores, is_member, 4)
    for row, value in zip(scores, auc, strict=True):
        assert float(value) == pytest.approx(metrics.roc_auc_score(is_member.numpy(), row.numpy()))
