"""The one-run audit's ε lower bound: exact arithmetic, validity under the null and under
ε-DP randomised response, and the random-inclusion canaries it needs."""

import math

import numpy as np
import pytest
import torch

import fesmia_hooks as fh
from fesmia_hooks.epsilon import (
    audit_p_value,
    best_attainable_epsilon,
    epsilon_from_guesses,
    epsilon_lower_bound,
    guess_counts,
)


def _binomial_tail(r, v, q):
    return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))


@pytest.mark.parametrize("r, v, eps", [(10, 7, 0.0), (20, 18, 1.0), (31, 25, 2.5), (5, 0, 0.3)])
def test_the_p_value_without_delta_is_the_binomial_tail(r, v, eps):
    q = math.exp(eps) / (1 + math.exp(eps))
    assert audit_p_value(100, r, v, eps, 0.0) == pytest.approx(_binomial_tail(r, v, q), rel=1e-9)


def test_the_delta_term_is_the_largest_average_below_the_count():
    r, v, eps, m, delta = 12, 9, 0.7, 50, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    alpha = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))
    expected = _binomial_tail(r, v, q) + 2 * m * delta * alpha
    assert audit_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)


def test_the_bound_is_the_largest_epsilon_the_count_disproves():
    m, r, v = 500, 100, 80
    eps = epsilon_from_guesses(m, r, v, delta=1e-5, confidence=0.95)
    assert eps > 0
    assert audit_p_value(m, r, v, eps * 0.999, 1e-5) < 0.05 <= audit_p_value(m, r, v, eps * 1.001,
                                                                               1e-5)
    assert epsilon_from_guesses(m, r, r // 2) == 0.0  # a coin's accuracy disproves nothing
    counts = [epsilon_from_guesses(m, r, c) for c in range(60, r + 1, 5)]
    assert counts == sorted(counts)  # more right guesses, a higher bound


def test_the_grid_of_guesses_is_fixed_by_the_count_alone():
    assert guess_counts(256) == [16, 32, 64, 128]
    assert guess_counts(1) == []
    assert all(1 <= k <= n // 2 for n in range(2, 300) for k in guess_counts(n))


def test_the_best_attainable_bound_grows_with_the_canaries():
    best = [best_attainable_epsilon(m) for m in (50, 100, 300, 1000, 3000)]
    assert best == sorted(best) and best[0] > 0
    assert best[-1] < 10


def _placebo_rate(scores_of, runs=400, m=200):
    rng = np.random.default_rng(12345)
    hits = 0
    for run in range(runs):
        member = rng.random(m) < 0.5
        # members first, as a CanarySet holds them: the order must not leak into the guesses
        member = np.sort(member)[::-1]
        bound = epsilon_lower_bound(scores_of(rng, m), member, seed=run)
        hits += bound.epsilon > 0
    return hits


@pytest.mark.parametrize("kind", ["continuous", "constant", "tie-heavy"])
def test_on_a_placebo_the_bound_is_zero_in_95_percent_of_runs(kind):
    scores = {
        "continuous": lambda rng, m: rng.normal(size=m),
        "constant": lambda rng, m: np.zeros(m),  # an untrained model: every score tied
        "tie-heavy": lambda rng, m: rng.integers(0, 3, size=m).astype(float),
    }[kind]
    hits = _placebo_rate(scores)
    # At most 5 % of runs may claim anything; 30 of 400 is 2.3 standard errors above 20.
    assert hits <= 30, f"{hits} of 400 placebo runs claimed an ε > 0"


def _randomised_response(rng, member, eps):
    truthful = rng.random(member.size) < math.exp(eps) / (1 + math.exp(eps))
    return np.where(member == truthful, 1.0, -1.0)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
def test_under_epsilon_dp_randomised_response_the_bound_stays_below_epsilon(eps):
    rng = np.random.default_rng(int(eps * 100))
    over = 0
    runs = 200
    for run in range(runs):
        member = rng.random(500) < 0.5
        bound = epsilon_lower_bound(_randomised_response(rng, member, eps), member, seed=run)
        over += bound.epsilon > eps
    assert over <= 15, f"{over} of {runs} runs put the bound above the true ε {eps}"


def test_under_randomised_response_the_bound_approaches_epsilon_as_canaries_grow():
    eps = 2.0
    rng = np.random.default_rng(7)
    means = []
    for m in (100, 1000, 10000):
        bounds = []
        for run in range(20):
            member = rng.random(m) < 0.5
            bounds.append(epsilon_lower_bound(_randomised_response(rng, member, eps), member,
                                              seed=run).epsilon)
        means.append(float(np.mean(bounds)))
    assert means == sorted(means)
    assert means[-1] > 0.85 * eps  # 10,000 canaries come within 15 % of the true ε
    assert max(means) <= eps


def test_a_perfect_attacker_gets_the_best_attainable_bound():
    rng = np.random.default_rng(0)
    member = rng.random(1000) < 0.5
    bound = epsilon_lower_bound(np.where(member, 1.0, 0.0) + rng.random(1000) * 0.1, member)
    # every guess right; k = 500 per side would guess on all and meet the other side
    # (about 500 members, not exactly), so the bound comes from k = 250
    assert bound.correct == bound.guesses == 500
    each = 1 - 0.05 / len(guess_counts(1000))
    assert bound.epsilon == epsilon_from_guesses(1000, 500, 500, confidence=each)
    assert bound.epsilon <= best_attainable_epsilon(1000)


def test_non_finite_scores_abstain():
    rng = np.random.default_rng(1)
    member = rng.random(200) < 0.5
    scores = np.where(member, 1.0, 0.0)
    scores[:50] = np.nan
    bound = epsilon_lower_bound(scores, member)
    assert bound.canaries == 200 and bound.guesses <= 150


@pytest.mark.parametrize("call, message", [
    (lambda: epsilon_lower_bound(np.zeros(3), np.zeros(4, bool)), "one entry per canary, got shapes (3,) and (4,)"),
    (lambda: epsilon_lower_bound(np.zeros((50, 2)), np.zeros(100, bool)), "got shapes (50, 2) and (100,)"),
    (lambda: epsilon_lower_bound(np.zeros(0), np.zeros(0, bool)), "at least one canary, got none"),
    (lambda: epsilon_lower_bound(["a", "b"], np.zeros(2, bool)), "`scores` must be numbers, one per canary, got list"),
    (lambda: audit_p_value(10, 5, 3, float("nan"), 0.0), "need a finite epsilon >= 0"),
    (lambda: epsilon_lower_bound(np.zeros(3), np.zeros(3)), "`is_member` must be booleans, got float64"),
    (lambda: epsilon_lower_bound(np.zeros(3), np.zeros(3, bool), confidence=1.5), "confidence"),
    (lambda: epsilon_lower_bound(np.zeros(3), np.zeros(3, bool), delta=-1.0), "delta"),
    (lambda: audit_p_value(10, 5, 6, 1.0, 0.0), "need 0 <= correct <= guesses <= canaries, got 6, 5 and 10"),
])
def test_bad_inputs_get_clear_errors(call, message):
    with pytest.raises(fh.ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


# ---------------------------------------------------------------- canaries for an audit
def _data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_for_audit_includes_each_canary_by_its_own_coin():
    x, y = _data()
    counts = []
    for seed in range(40):
        (x_in, y_in), canaries = fh.CanarySet.for_audit((x, y), num_classes=4, size=100, seed=seed)
        assert canaries.random_inclusion and len(canaries) == 100
        assert torch.equal(x_in, canaries.inputs[: canaries.num_members])
        assert torch.equal(y_in, canaries.labels[: canaries.num_members])
        counts.append(canaries.num_members)
    # independent coins: the member count varies as Binomial(100, 1/2) (sd 5), not fixed
    assert len(set(counts)) > 5 and 40 < np.mean(counts) < 60


def test_for_audit_gives_wrong_labels_and_keeps_the_data_form():
    x, y = _data()
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    (x_in, y_in), canaries = fh.CanarySet.for_audit((x, one_hot), num_classes=4, size=100, seed=3)
    assert y_in.shape == (canaries.num_members, 4) and y_in.dtype == one_hot.dtype
    # each canary's label differs from the true label of its input
    rows = {tuple(r.tolist()): int(t) for r, t in zip(x, y, strict=True)}
    assert all(rows[tuple(r.tolist())] != int(lab) for r, lab in zip(canaries.inputs, canaries.labels, strict=True))
    (_, _), kept = fh.CanarySet.for_audit((x, y), size=100, seed=3, mislabel=False)
    assert all(rows[tuple(r.tolist())] == int(lab) for r, lab in zip(kept.inputs, kept.labels, strict=True))


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 500, "num_classes": 4}, "for_audit(size=500) needs at least 500 samples, got 400"),
    ({"size": 100}, "for_audit(mislabel=True) needs `num_classes`, got None"),
    ({"size": 1, "num_classes": 4}, "`size` must be an int >= 2, got 1"),
])
def test_for_audit_refuses_bad_requests(kwargs, message):
    with pytest.raises(fh.CanaryError if "needs" in message else fh.ConfigurationError,
                       match=message.replace("(", r"\(").replace(")", r"\)")):
        fh.CanarySet.for_audit(_data(), **kwargs)


def test_random_inclusion_is_declared_not_assumed():
    x, y = _data()
    plain = fh.CanarySet(members=(x[:50], y[:50]), non_members=(x[50:100], y[50:100]))
    assert not plain.random_inclusion
    declared = fh.CanarySet(members=(x[:50], y[:50]), non_members=(x[50:100], y[50:100]),
                            random_inclusion=True)
    assert declared.random_inclusion
    with pytest.raises(fh.ConfigurationError, match="`random_inclusion` must be True or False"):
        fh.CanarySet(members=(x[:50], y[:50]), non_members=(x[50:100], y[50:100]),
                     random_inclusion="yes")


def test_for_audit_reads_only_the_drawn_samples_of_a_dataset():
    from torch.utils.data import Dataset

    class Counting(Dataset):
        def __init__(self):
            self.reads = 0
            self.x, self.y = _data(2000)

        def __len__(self):
            return 2000

        def __getitem__(self, i):
            self.reads += 1
            return self.x[i], self.y[i]

    data = Counting()
    (_, _), canaries = fh.CanarySet.for_audit(data, num_classes=4, size=64)
    assert len(canaries) == 64 and data.reads == 64


@pytest.mark.parametrize("labels, kwargs, message", [
    (lambda y: y + 5, {"num_classes": 4}, "label(s) fall outside [0, 4)"),
    (lambda y: y.float() + 0.5, {"num_classes": 4}, "needs integer class labels"),
    (lambda y: y, {"num_classes": 4, "seed": 1.5}, "`seed` must be an int >= 0, got 1.5"),
])
def test_for_audit_checks_the_labels_it_is_given(labels, kwargs, message):
    x, y = _data()
    with pytest.raises((fh.CanaryError, fh.ConfigurationError),
                       match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        fh.CanarySet.for_audit((x, labels(y)), size=100, **kwargs)
