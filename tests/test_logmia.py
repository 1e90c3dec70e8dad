"""Log-MIA against a straightforward re-implementation, scikit-learn's ROC and the chance table."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

import fesmia_hooks as fh
from fesmia_hooks.logmia import batched_auc, batched_log_mia


def reference_log_mia(scores, is_member):
    """Walk every threshold (each distinct score) and keep the best TP under each FP cap."""
    scores = np.asarray(scores, dtype=float)
    is_member = np.asarray(is_member, dtype=bool)
    n = int(is_member.sum())
    k = math.ceil(math.log(len(scores)))
    best = {0: 0, k: 0}
    for t in np.unique(scores):
        named = scores >= t
        tp = int((named & is_member).sum())
        fp = int((named & ~is_member).sum())
        for cap in best:
            if fp <= cap:
                best[cap] = max(best[cap], tp)
    return math.log(best[0] + 1) / math.log(n + 1), math.log(best[k] + 1) / math.log(n + 1)


@pytest.mark.parametrize("levels", [None, 2, 4, 7])
def test_log_mia_equals_reference_on_random_and_tied_scores(levels):
    rng = np.random.default_rng(levels or 0)
    for _ in range(300):
        n, m = rng.integers(1, 20, size=2)
        raw = rng.normal(size=n + m)
        scores = raw if levels is None else rng.integers(0, levels, size=n + m).astype(float)
        labels = np.r_[np.ones(n, bool), np.zeros(m, bool)]
        rng.shuffle(labels)
        got = fh.log_mia(scores, labels)
        strict, relaxed = reference_log_mia(scores, labels)
        assert got.strict == pytest.approx(strict, abs=1e-6)
        assert got.relaxed == pytest.approx(relaxed, abs=1e-6)


def test_log_mia_matches_sklearn_roc_without_dropping_points():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scores = rng.integers(0, 5, size=30).astype(float)
        labels = np.r_[np.ones(15, bool), np.zeros(15, bool)]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        fp, tp = np.round(fpr * 15), np.round(tpr * 15)
        expected = math.log(tp[fp <= 4].max() + 1) / math.log(16)
        assert fh.log_mia(scores, labels).relaxed == pytest.approx(expected, abs=1e-6)
        ours_fp, ours_tp, _ = fh.roc_counts(scores, labels)
        np.testing.assert_array_equal(ours_fp, fp)
        np.testing.assert_array_equal(ours_tp, tp)


def test_ties_are_never_broken_by_position():
    # A member tied with a non-member at the top: naming it costs a false positive.
    scores = [1.0, 1.0, 0.5, 0.2]
    assert fh.log_mia(scores, [True, False, True, False]).strict == 0.0
    assert fh.log_mia(scores, [False, True, True, False]).strict == 0.0


def test_perfect_and_worst_rankings():
    scores = np.arange(30, dtype=float)[::-1]
    labels = np.r_[np.ones(15, bool), np.zeros(15, bool)]
    assert fh.log_mia(scores, labels) == fh.LogMIA(1.0, 1.0)
    worst = fh.log_mia(scores, ~labels)
    assert worst.strict == 0.0 and worst.relaxed == 0.0


def test_batched_matches_single():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (64, 30), generator=g).float()
    labels = torch.zeros(30, dtype=torch.bool)
    labels[:15] = True
    strict, relaxed = batched_log_mia(scores, labels)
    for row in range(64):
        single = fh.log_mia(scores[row], labels)
        assert strict[row].item() == pytest.approx(single.strict, abs=1e-6)
        assert relaxed[row].item() == pytest.approx(single.relaxed, abs=1e-6)


def test_batched_auc_counts_ties_as_half():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    labels = torch.tensor([True, True, False, False])
    assert batched_auc(scores, labels).item() == pytest.approx((1 + 1 + 0.5 + 1) / 4)


# The chance table of docs/science.md#chance (computed independently, checked by simulation):
# N, chance strict, chance relaxed.
CHANCE_TABLE = [
    (5, 0.2605, 0.7840),
    (10, 0.2029, 0.5926),
    (15, 0.1780, 0.5884),
    (20, 0.1633, 0.5366),
    (25, 0.1532, 0.5019),
    (30, 0.1458, 0.5266),
    (50, 0.1281, 0.4603),
    (100, 0.1096, 0.4245),
]


@pytest.mark.parametrize("n, strict, relaxed", CHANCE_TABLE)
def test_chance_matches_the_documented_table(n, strict, relaxed):
    chance = fh.chance_log_mia(n)
    assert round(chance.strict, 4) == strict
    assert round(chance.relaxed, 4) == relaxed


def test_chance_matches_simulation_of_random_rankings():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(15, bool), np.zeros(15, bool)]
    draws = [fh.log_mia(rng.normal(size=30), labels) for _ in range(4000)]
    chance = fh.chance_log_mia(15)
    sd = np.std([d.relaxed for d in draws]) / math.sqrt(len(draws))
    assert np.mean([d.relaxed for d in draws]) == pytest.approx(chance.relaxed, abs=4 * sd)
    assert np.mean([d.strict for d in draws]) == pytest.approx(chance.strict, abs=0.02)


def test_chance_with_unequal_sides_is_a_distribution():
    from fesmia_hooks.logmia import _tp_distribution

    for members, non_members, k in [(3, 10, 0), (10, 3, 2), (7, 7, 7), (5, 2, 4)]:
        assert sum(_tp_distribution(members, non_members, k)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        ([0.1, 0.2], [True], "same length, got 2 and 1"),
        ([0.1, float("nan")], [True, False], "must be finite"),
        ([0.1, 0.2], [True, True], "at least one member and one non-member, got 2 members"),
        ([[0.1, 0.2]], [[True, False]], "one-dimensional, got shape"),
    ],
)
def test_log_mia_rejects_bad_input(scores, labels, message):
    with pytest.raises(fh.ConfigurationError, match=message):
        fh.log_mia(scores, labels)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "15"])
def test_chance_rejects_bad_queries(bad):
    with pytest.raises(fh.ConfigurationError, match="`queries` must be a positive int, got"):
        fh.chance_log_mia(bad)
