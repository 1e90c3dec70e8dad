"""Readings people can act on: chance-aware levels, the interval's meaning, the alarm
statistic under the null, checks that cannot alarm, the pre-flight check, permutations."""

import math
import warnings

import pytest
import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.calibration import DEFAULT_STATISTIC, alarm_components, alarm_statistic
from fesmia_hooks.logmia import chance_counts
from fesmia_hooks.measurement import STATISTICS
from fesmia_hooks.report import share_beyond_chance
from fesmia_hooks.sequential import permutation_p_values


def pool(seed, shift=0.0, n=64, features=2):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2 * n, features, generator=g)
    f[:n] += shift
    return f


@pytest.mark.parametrize("queries", [5, 10, 15, 30])
def test_at_chance_no_level_above_low_for_any_number_of_queries(queries):
    chance = chance_counts(queries)[0]
    assert share_beyond_chance(chance, chance, queries) == 0.0
    assert fh.LevelBands().classify(0.0, significant=True) is fh.Level.LOW
    named, shares, levels = [], [], []
    for seed in range(20):
        probe = fh.FeSMIA(shots=3, queries=queries, episodes=40, permutations=99, seed=seed)
        report = fh.Calibration().single_check(probe.attack(pool(seed), 64))
        named.append(report.members_named)
        shares.append(report.share_beyond_chance)
        levels.append(report.level)
    # above none only when a 5 % test rejects by chance
    assert sum(level > fh.Level.NONE for level in levels) <= 3
    # the mean count named with no false accusation sits at its exact chance level, so the
    # share beyond chance, the level's reading, sits at 0 whatever the number of queries
    assert abs(sum(named) / len(named) - chance) < 0.35
    assert abs(sum(shares) / len(shares)) < 0.05


def test_members_named_is_the_mean_count_not_a_geometric_reading():
    m = fh.FeSMIA(episodes=200, permutations=9, seed=1).attack(pool(1), 64)
    geometric = (m.queries + 1) ** m.strict - 1
    assert m.members_named > geometric  # Jensen: the mean count exceeds the geometric reading


def test_the_canary_interval_is_wider_than_the_episode_interval_and_covers_the_population():
    truth = fh.FeSMIA(episodes=3000, permutations=1, seed=0).attack(pool(999, 0.5, 3000), 3000)
    covered = {"strict": 0, "auc": 0}
    episode_covered = {"strict": 0, "auc": 0}
    for seed in range(40):
        m = fh.FeSMIA(episodes=100, permutations=9, seed=seed).attack(pool(seed, 0.5), 64)
        for r in covered:
            low, high = getattr(m, f"{r}_low"), getattr(m, f"{r}_high")
            e_low, e_high = getattr(m, f"{r}_episode_low"), getattr(m, f"{r}_episode_high")
            assert high - low > e_high - e_low
            covered[r] += low <= getattr(truth, r) <= high
            episode_covered[r] += e_low <= getattr(truth, r) <= e_high
    assert min(covered.values()) >= 0.85 * 40  # the interval over canary draws covers
    assert max(episode_covered.values()) < 0.75 * 40  # the episode interval does not


@pytest.mark.parametrize("statistic", ["auc+strict", "relaxed", "pooled_auc+strict",
                                       "centroid_auc+centroid_strict", "centroid_strict"])
def test_every_statistic_keeps_its_size_under_the_null(statistic):
    rejected = 0
    pools = 150
    for seed in range(pools):
        probe = fh.FeSMIA(episodes=20, permutations=99, seed=seed)
        probe.use_statistics(alarm_components(statistic))
        m = probe.attack(pool(seed), 64)
        observed, null = alarm_statistic(statistic, m)
        rank, _ = permutation_p_values(observed, null)
        rejected += rank / 100 <= 0.05
    # 5 % expected; a valid test stays under about 10 % in 150 pools
    assert rejected <= 15


def test_the_min_p_statistic_finds_a_low_tail_that_strict_misses():
    found = {"auc+strict": 0, "centroid_auc+centroid_strict": 0, "strict": 0}
    for seed in range(30):
        f = pool(seed)
        g = torch.Generator().manual_seed(seed)
        tail = (torch.rand(64, generator=g) < 0.3)
        f[64:][tail] -= 3.0  # non-members with a low tail; the top of the ranking is unchanged
        probe = fh.FeSMIA(episodes=50, permutations=99, seed=seed)
        probe.use_statistics(STATISTICS)
        m = probe.attack(f, 64)
        for statistic in found:
            found[statistic] += fh.Calibration(statistic=statistic).single_check(m).significant
    assert found["auc+strict"] > 2 * found["strict"]
    assert found["centroid_auc+centroid_strict"] > 2 * found["strict"]


def test_a_check_that_cannot_alarm_says_so():
    # 20 permutations allow 0.05 * 20 = 1 trajectory to alarm in the whole run; spread over a
    # horizon of 50 checks, the first checks get none of it, and their reports say so.
    calibration = fh.Calibration(horizon=50)
    probe = fh.FeSMIA(episodes=10, permutations=19)
    first = calibration.report(probe.attack(pool(0, 3.0), 64), check=1)
    assert not first.can_alarm and not first.significant and first.p_value == 0.05
    assert "could not raise an alarm" in first.summary()
    assert first.as_dict()["can_alarm"] is False


def test_early_checks_can_alarm_under_a_long_horizon():
    # LightningCLI's default max_epochs=1000 with 999 permutations: the allowance is
    # front-loaded, so the first checks can alarm (a linear spending would starve them).
    calibration = fh.Calibration(horizon=1000)
    probe = fh.FeSMIA(episodes=10, permutations=999)
    first = calibration.report(probe.attack(pool(0, 3.0), 64), check=1)
    assert first.can_alarm and first.significant and first.p_threshold > 0


def test_auto_permutations_follow_the_horizon_and_a_mismatched_state_is_refused():
    canaries = fh.CanarySet(members=(pool(0)[:64], torch.zeros(64, dtype=torch.long)),
                            non_members=(pool(0)[64:], torch.ones(64, dtype=torch.long)))
    monitor = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5))
    assert monitor.probe.permutations == 999
    monitor.reset(horizon=100)
    assert monitor.probe.permutations == 1999  # horizon / alpha - 1
    monitor.reset(horizon=10)
    assert monitor.probe.permutations == 999  # never fewer
    monitor.reset(horizon=10_000)
    assert monitor.probe.permutations == 4999  # never more
    fixed = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5, permutations=99))
    fixed.step(nn.Linear(2, 2), epoch=0)
    other = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5, permutations=199))
    with pytest.raises(fh.ConfigurationError, match="tested with 99 label permutations"):
        other.load_state_dict(fixed.state_dict())
    auto = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5))
    auto.load_state_dict(fixed.state_dict())
    assert auto.probe.permutations == 99


def test_preflight_refuses_a_split_that_is_not_exchangeable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    x[64:] += 2.0  # non-members from elsewhere
    y = torch.randint(0, 3, (128,), generator=g)
    split = fh.CanarySet(members=(x[:64], y[:64]), non_members=(x[64:], y[64:]))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    probe = fh.FeSMIA(episodes=20, permutations=999)
    with pytest.raises(fh.CanaryError, match="before training, the attack already tells"):
        fh.PrivacyMonitor(split, probe=probe).preflight(model)
    warned = fh.PrivacyMonitor(split, probe=probe, preflight="warn")
    with pytest.warns(UserWarning, match="split is not exchangeable"):
        baseline = warned.preflight(model)
    assert warned.baseline is baseline and baseline.significant
    assert warned.header()["baseline"]["significant"]
    assert fh.PrivacyMonitor(split, probe=probe, preflight="off").preflight(model) is None
    fair = fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:64], y[32:64]))
    report = fh.PrivacyMonitor(fair, probe=fh.FeSMIA(episodes=20, permutations=999,
                                                     shots=3, queries=10)).preflight(model)
    assert not report.significant


def test_attach_runs_the_preflight_check_before_training():
    from fesmia_hooks.integrations.torch import attach

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    x[64:] += 2.0
    y = torch.randint(0, 3, (128,), generator=g)
    split = fh.CanarySet(members=(x[:64], y[:64]), non_members=(x[64:], y[64:]))
    model = nn.Linear(4, 3)
    monitor = fh.PrivacyMonitor(split, probe=fh.FeSMIA(episodes=20, permutations=999),
                                every_n_steps=5)
    with pytest.raises(fh.CanaryError, match="not exchangeable"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), monitor)


def test_below_chance_readings_say_so():
    report = fh.report._example_report().with_updates(strict=0.16)
    assert "(below chance 0.18)" in report.summary()


def test_tpr_at_a_rate_the_pool_cannot_resolve_is_nan():
    m = fh.FeSMIA(episodes=20, permutations=9).attack(pool(0), 64)
    assert set(m.tpr_at_fpr) == {0.0, 0.05, 0.1}
    small = fh.FeSMIA(episodes=20, permutations=9, shots=2, queries=5).attack(pool(0, n=10), 10)
    assert math.isnan(small.tpr_at_fpr[0.05])  # 1 false positive of 10 is already 10 %
    assert not math.isnan(small.tpr_at_fpr[0.1])


def test_statistic_must_name_known_statistics():
    with pytest.raises(fh.ConfigurationError, match="`statistic` must be one of"):
        fh.Calibration(statistic="auc+loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fh.Calibration(statistic="pooled_auc")


def test_min_p_ties_at_the_smallest_p_are_broken_so_one_trajectory_can_alarm():
    from fesmia_hooks.measurement import Measurement
    from fesmia_hooks.report import _example_report

    base = {k: v for k, v in _example_report().__dict__.items()
            if k in Measurement.__dataclass_fields__}
    null = torch.rand(1999, len(STATISTICS), generator=torch.Generator().manual_seed(0))
    observed = dict.fromkeys(STATISTICS, 2.0)
    m = Measurement(**base, statistics=observed, null=null)
    report = fh.Calibration(horizon=100).report(m, check=1)
    assert report.p_value == pytest.approx(1 / 2000)  # alone at the top
    assert report.significant and report.can_alarm
    value, null_values = alarm_statistic(DEFAULT_STATISTIC, m)
    ranks = [(null_values >= v).sum().item() for v in null_values.tolist()]
    assert len(set(ranks)) > len(ranks) * 0.9  # (almost) no ties left among the permutations


def test_a_learner_returning_nan_fails_the_check_instead_of_hanging():
    def broken(support, query, shots):
        return torch.full(query.shape[:2], float("nan"))

    with pytest.raises(fh.ProbeError, match="non-finite scores"):
        fh.FeSMIA(broken, episodes=5, permutations=9).attack(pool(0), 64)


def test_a_learners_random_draws_leave_trainings_streams_alone():
    import random

    import numpy as np

    def noisy(support, query, shots):
        return query[..., 0] + torch.rand(query.shape[:2]) + float(np.random.rand() + random.random())

    canaries = fh.CanarySet(members=(pool(1)[:64], torch.zeros(64, dtype=torch.long)),
                            non_members=(pool(1)[64:], torch.ones(64, dtype=torch.long)))
    model, probe = nn.Linear(2, 2), fh.FeSMIA(noisy, episodes=5, permutations=9)
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    probe.measure(model, canaries)
    after = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    assert (torch.rand(1), np.random.rand(), random.random()) == after


def test_a_state_is_refused_whole_or_loaded_whole():
    canaries = fh.CanarySet(members=(pool(2)[:64], torch.zeros(64, dtype=torch.long)),
                            non_members=(pool(2)[64:], torch.ones(64, dtype=torch.long)))
    monitor = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5, permutations=99))
    for epoch in range(2):
        monitor.step(nn.Linear(2, 2), epoch=epoch)
    good = monitor.state_dict()
    for bad in ({**good, "history": [{"check": 1}]}, {**good, "stop_reason": "bogus"}):
        with pytest.raises(fh.ConfigurationError, match="not a monitor's state"):
            monitor.load_state_dict(bad)
        assert monitor.checks == 2 and len(monitor.history) == 2  # nothing changed
        assert not monitor.is_due(epoch=1)
    other = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5, permutations=99),
                              statistic="relaxed")
    with pytest.raises(fh.ConfigurationError, match="calibrated with statistic="):
        other.load_state_dict(good)


def test_auto_permutations_survive_a_state_saved_before_the_first_check():
    canaries = fh.CanarySet(members=(pool(3)[:64], torch.zeros(64, dtype=torch.long)),
                            non_members=(pool(3)[64:], torch.ones(64, dtype=torch.long)))
    first = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5))
    first.reset(horizon=100)
    assert first.probe.permutations == 1999
    resumed = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=5))
    resumed.load_state_dict(first.state_dict())
    assert resumed.probe.permutations == 1999 and resumed.calibration.horizon == 100


def test_a_run_that_starts_on_a_trained_model_skips_the_preflight_check():
    from fesmia_hooks.integrations.driver import MonitorDriver

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    x[64:] += 2.0  # what a model that memorised its members would show, say
    y = torch.randint(0, 3, (128,), generator=g)
    split = fh.CanarySet(members=(x[:64], y[:64]), non_members=(x[64:], y[64:]))
    driver = MonitorDriver(split, probe=fh.FeSMIA(episodes=20, permutations=999))
    driver.begin_run(model=nn.Linear(4, 3), fresh=False)  # resumed training: not checked
    with pytest.raises(fh.CanaryError):
        driver.begin_run(model=nn.Linear(4, 3))  # from step 0: checked


def test_a_statistic_the_probe_did_not_compute_under_its_permutations_is_refused():
    probe = fh.FeSMIA(episodes=20, permutations=49, seed=0)
    m = probe.attack(pool(0), 64)  # the default alarm's statistics only
    assert fh.Calibration().single_check(m).p_value > 0
    with pytest.raises(fh.ConfigurationError, match=r"reads 'auc', 'strict', which the probe"):
        fh.Calibration(statistic="auc+strict").single_check(m)
    probe.use_statistics(alarm_components("auc+strict"))
    assert fh.Calibration(statistic="auc+strict").single_check(probe.attack(pool(0), 64))


def test_a_null_without_a_column_per_statistic_is_refused():
    from fesmia_hooks.measurement import Measurement
    from fesmia_hooks.report import _example_report

    base = {k: v for k, v in _example_report().__dict__.items()
            if k in Measurement.__dataclass_fields__}
    old = Measurement(**base, statistics=dict.fromkeys(STATISTICS, 0.5), null=torch.rand(99, 4))
    with pytest.raises(fh.ConfigurationError, match=r"must be \[permutations, 7\].*got \[99, 4\]"):
        fh.Calibration().single_check(old)


def test_checks_compute_their_own_monitors_statistics_whatever_else_uses_the_probe():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 4, generator=g), torch.randint(0, 3, (128,), generator=g)
    canaries = fh.CanarySet(members=(x[:64], y[:64]), non_members=(x[64:], y[64:]))
    model = nn.Linear(4, 3)
    probe = fh.FeSMIA(episodes=10, permutations=99, seed=0)
    probe.use_statistics(["auc", "strict"])
    assert probe.evaluate(model, canaries).statistic == probe.default_statistic
    # one probe, two monitors testing different statistics
    episodes = fh.PrivacyMonitor(canaries, probe=probe, statistic="auc+strict", preflight="off")
    default = fh.PrivacyMonitor(canaries, probe=probe, preflight="off")
    assert episodes.check(model, epoch=0).statistic == "auc+strict"
    assert default.check(model, epoch=0).statistic == "signal_mean+centroid_strict"
    assert not episodes.errors and not default.errors


def test_a_preflight_check_leaves_a_pending_asynchronous_check_alone():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 4, generator=g), torch.randint(0, 3, (128,), generator=g)
    canaries = fh.CanarySet(members=(x[:64], y[:64]), non_members=(x[64:], y[64:]))
    model = nn.Linear(4, 3)
    monitor = fh.PrivacyMonitor(canaries, probe=fh.FeSMIA(episodes=10, permutations=199),
                                asynchronous=True, preflight="warn", tensorboard=False)
    monitor.check(model, epoch=0)  # its attack runs on the worker thread
    monitor.preflight(model)  # tests other statistics meanwhile
    monitor.flush()
    assert len(monitor.history) == 1 and not monitor.errors
    assert monitor.history[0].statistic == "signal_mean+centroid_strict"
    monitor.close()
    # deterministically: what a prepared attack computes is fixed when it is prepared
    probe = fh.FeSMIA(episodes=10, permutations=49)
    attack = probe.prepare(model, canaries)
    probe.use_statistics(["auc", "strict"])
    measured = attack()
    assert fh.Calibration().single_check(measured).statistic == "signal_mean+centroid_strict"
    assert torch.isnan(measured.null[:, STATISTICS.index("auc")]).all()


def _measurement(null, statistics):
    from fesmia_hooks.measurement import Measurement
    from fesmia_hooks.report import _example_report

    base = {k: v for k, v in _example_report().__dict__.items()
            if k in Measurement.__dataclass_fields__}
    return Measurement(**base, statistics=statistics, null=null)


@pytest.mark.parametrize("seed", range(8))
def test_the_min_p_combination_is_the_rank_rule_it_documents(seed):
    # Reference: each trajectory's p-value per statistic is the share of all B + 1 at least
    # as large (within 1e-6); the statistic is minus the smallest, ties broken by the mean.
    g = torch.Generator().manual_seed(seed)
    parts = [STATISTICS[i] for i in torch.randperm(len(STATISTICS), generator=g)[:2 + seed % 4]]
    null = (torch.randn(299, len(STATISTICS), generator=g, dtype=torch.float64) * 3).round() / 3
    observed = {s: float(v) for s, v in zip(STATISTICS, null[seed], strict=True)}
    value, null_values = alarm_statistic("+".join(parts), _measurement(null, observed))
    every = torch.cat([null[:, [STATISTICS.index(p) for p in parts]],
                       torch.tensor([[observed[p] for p in parts]], dtype=torch.float64)])
    p = torch.stack([(every[:, k][None, :] >= every[:, k][:, None] - 1e-6).double().mean(1)
                     for k in range(len(parts))], dim=1)
    expected = -p.min(1).values - p.mean(1) / (2 * every.shape[0])
    got = torch.cat([null_values, torch.tensor([value], dtype=torch.float64)])
    # distinct values of the statistic differ by at least 1 / (2 K (B + 1)^2), about 1e-6
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_a_nan_statistic_cannot_raise_an_alarm():
    null = torch.rand(999, len(STATISTICS), generator=torch.Generator().manual_seed(1))
    observed = dict.fromkeys(STATISTICS, float("nan"))
    observed["centroid_strict"] = 2.0  # beyond every permutation on one of the two
    m = _measurement(null, observed)
    # the NaN statistic reads p = 1 (no evidence), so the combination rests on the other
    value, _ = alarm_statistic("signal_mean+centroid_strict", m)
    assert value == pytest.approx(-1 / 1000 - (1 / 1000 + 1) / 2 / 2000)
    report = fh.Calibration(statistic="signal_mean", alpha=0.05).single_check(m)
    assert report.p_value == 1.0 and not report.significant


@pytest.mark.parametrize("seed", range(4))
def test_interval_percentiles_are_numpys_sample_quantiles(seed):
    import numpy as np

    from fesmia_hooks.measurement import linear_percentiles

    rng = np.random.default_rng(seed)
    for halves in (1, 2, 3, 40, 41, 200):
        rows = rng.normal(size=(3, halves)) * 10.0 ** rng.integers(-6, 6)
        rows[1] = np.round(rows[1], 1)  # ties
        if halves > 2:
            rows[2, 0] = np.nan  # a NaN row reads NaN
        for quantiles in ((0.025, 0.975), (0.0, 0.5, 1.0), tuple(rng.random(4))):
            expected = np.quantile(rows, list(quantiles), axis=1)
            assert np.array_equal(linear_percentiles(rows, quantiles), expected, equal_nan=True)
