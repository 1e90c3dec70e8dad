"""Run-level false-alarm control over repeated checks (docs/science.md#run-level-test)."""

import pytest
import torch

import fesmia_hooks as fh
from fesmia_hooks.sequential import observed_rank, permutation_p_values


def test_p_values_are_ranks_among_all_statistics():
    rank, null_ranks = permutation_p_values(0.5, torch.tensor([0.9, 0.5, 0.1, 0.5]))
    assert rank == 4  # itself, 0.9 and the two ties
    assert null_ranks.tolist() == [1, 4, 5, 4]


def test_spending_reaches_alpha_only_at_the_horizon():
    assert fh.SequentialTest(0.05, horizon=10).spent(5) == pytest.approx(0.025)
    assert fh.SequentialTest(0.05, horizon=10).spent(50) == pytest.approx(0.05)
    open_ended = fh.SequentialTest(0.05)
    assert open_ended.spent(10) == pytest.approx(0.025)
    assert open_ended.spent(10_000) < 0.05


def correlated_trajectories(runs, checks, seed):
    """Exchangeable null trajectories: a random walk per run, strongly correlated in time."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(runs, checks, generator=g)
    steps[:, 0] *= 5
    return steps.cumsum(1)


@pytest.mark.parametrize("horizon", [None, 30])
def test_false_alarm_rate_per_run_stays_at_alpha(horizon):
    # Every trajectory takes its turn as "observed" against the others as the null.
    checks, b = 30, 199
    walks = correlated_trajectories(b + 1, checks, seed=1)
    alarms = 0
    for observed in range(b + 1):
        test = fh.SequentialTest(alpha=0.05, horizon=horizon)
        others = torch.cat([walks[:observed], walks[observed + 1 :]])
        fired = False
        for c in range(checks):
            _, _, significant = test.update(float(walks[observed, c]), others[:, c])
            fired |= significant
        alarms += fired
    assert alarms / (b + 1) <= 0.05


def test_naive_per_check_testing_would_cry_wolf():
    # The same trajectories tested at 5 % per check alarm far more often: the correction matters.
    checks, b = 30, 199
    walks = correlated_trajectories(b + 1, checks, seed=1)
    walks += 0.3 * torch.randn(b + 1, checks, generator=torch.Generator().manual_seed(2))
    naive = 0
    for observed in range(b + 1):
        others = torch.cat([walks[:observed], walks[observed + 1 :]])
        ranks = [permutation_p_values(float(walks[observed, c]), others[:, c])[0]
                 for c in range(checks)]
        naive += min(ranks) / (b + 1) <= 0.05
    assert naive / (b + 1) > 0.1


def test_strong_leakage_is_significant_once_alpha_allows():
    test = fh.SequentialTest(alpha=0.05)
    null = torch.linspace(0.0, 1.0, 499)
    results = [test.update(5.0, null) for _ in range(3)]
    assert all(r[0] == pytest.approx(1 / 500) for r in results)
    assert results[0][2] and results[0][1] >= 1 / 500


def test_state_round_trip_continues_the_same_decisions():
    walks = correlated_trajectories(100, 12, seed=4)
    full = fh.SequentialTest(alpha=0.2)
    outputs = [full.update(float(walks[0, c]), walks[1:, c]) for c in range(12)]
    first = fh.SequentialTest(alpha=0.2)
    for c in range(6):
        first.update(float(walks[0, c]), walks[1:, c])
    resumed = fh.SequentialTest(alpha=0.2)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(float(walks[0, c]), walks[1:, c]) for c in range(6, 12)] == outputs[6:]
    older = fh.SequentialTest(alpha=0.2)
    older.load_state_dict({})  # an older or empty state loads with defaults
    assert older.checks == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"alpha": 0}, r"`alpha` must be a number in \(0, 1\), got 0"),
     ({"horizon": 0}, "`horizon` must be a positive int, got 0")],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(fh.ConfigurationError, match=message):
        fh.SequentialTest(**kwargs)


def test_a_nan_statistic_ranks_below_every_other():
    # NaN is no evidence of leakage: an observed NaN reads p = 1 (it used to read the
    # smallest p-value, 1 / (B + 1), an alarm), and a NaN permutation ranks last.
    null = torch.tensor([0.9, float("nan"), 0.1])
    rank, null_ranks = permutation_p_values(float("nan"), null)
    assert rank == 4
    assert observed_rank(float("nan"), null) == 4
    assert null_ranks.tolist() == [1, 4, 2]
    rank, null_ranks = permutation_p_values(0.5, null)
    assert rank == 2 and null_ranks.tolist() == [1, 4, 3]


@pytest.mark.parametrize("seed", range(6))
def test_ranks_agree_with_counting_each_statistic_at_least_as_large(seed):
    g = torch.Generator().manual_seed(seed)
    null = (torch.randn(500, generator=g, dtype=torch.float64) * 4).round() / 4  # many ties
    observed = float(null[seed])
    rank, null_ranks = permutation_p_values(observed, null)
    everything = torch.cat([null, torch.tensor([observed], dtype=torch.float64)])
    assert rank == int((everything >= observed - 1e-6).sum()) == observed_rank(observed, null)
    assert null_ranks.tolist() == [int((everything >= v - 1e-6).sum()) for v in null.tolist()]
    assert null_ranks.dtype == torch.int64
