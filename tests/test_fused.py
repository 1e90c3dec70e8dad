"""The fused attack loop gives the same readings as its torch reference, ties included."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import fesmia_hooks as fh
from fesmia_hooks import fused
from fesmia_hooks.episodes import EpisodePlan
from fesmia_hooks.exceptions import ProbeError
from fesmia_hooks.measurement import EPISODE_STATISTICS, POOL_STATISTICS, STATISTICS
from fesmia_hooks.readings import HAVE_NUMBA

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="the compiled loop needs numba")


def features(kind, seed, n=64, width=4):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, width, generator=g)
    if kind == "ties":  # a few distinct values: scores tie within and across episodes
        return torch.randint(-2, 3, (n, width), generator=g).float()
    if kind == "duplicates":  # whole canaries repeated
        base = torch.randn(n // 4, width, generator=g)
        return base[torch.randint(0, n // 4, (n,), generator=g)]
    if kind == "saturated":  # one constant column, one huge, one tiny
        x = torch.randn(n, width + 3, generator=g)
        x[:, 0] = 1.0
        x[:, 1] *= 1e6
        x[:, 2] *= 1e-6
        return x
    raise AssertionError(kind)


@needs_numba
@pytest.mark.parametrize("kind", ["gaussian", "ties", "duplicates", "saturated"])
@pytest.mark.parametrize("seed", range(6))
def test_compiled_and_reference_loops_read_the_same(kind, seed):
    x = fused.host_features(features(kind, seed, width=(1, 4, 5, 8, 3, 13)[seed]))
    half = 32
    plan = EpisodePlan(half, half, shots=1 + seed % 5, queries=5 + seed, episodes=30,
                       permutations=40, seed=seed)
    slots, perms, identity = plan.host()
    flags = plan.query_is_member.numpy()
    for rows in (identity, perms):
        args = (x, slots, rows, flags, plan.shots, 1 + seed % 3, half, True, True)
        from fesmia_hooks import _kernels

        *outputs, broken = _kernels.simpleshot_episodes(*args)
        assert broken == 0
        got = fused.EpisodeReadings(*outputs)
        ref = fused.simpleshot_readings_torch(*args)
        for field in dataclasses.fields(fused.EpisodeReadings):
            a, b = getattr(got, field.name), getattr(ref, field.name)
            np.testing.assert_array_equal(a, b, err_msg=f"{field.name} ({kind}, seed {seed})")


def test_the_fused_path_and_the_batched_learner_path_give_the_same_report():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 4, generator=g)
    x[:64, 0] += 0.6  # some leakage, so that readings are not all at chance
    x = torch.round(x * 4) / 4  # and ties
    fast = fh.FeSMIA(permutations=199, seed=3)
    slow = fh.FeSMIA(permutations=199, seed=3)
    assert fast._fused
    slow._fused = False  # the learner path: batches of SimpleShot scores, read afterwards
    for probe in (fast, slow):
        probe.use_statistics(STATISTICS)  # every statistic under the permutations
    a, b = fast.attack(x, 64), slow.attack(x, 64)
    assert not a.null.isnan().any()
    for field in dataclasses.fields(a):
        if field.name.startswith("seconds"):
            continue
        u, v = getattr(a, field.name), getattr(b, field.name)
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v), field.name
        elif isinstance(u, np.ndarray):
            np.testing.assert_array_equal(u, v, err_msg=field.name)
        elif isinstance(u, float) and math.isnan(u):
            assert math.isnan(v), field.name
        else:
            assert u == v, field.name


def test_only_the_plain_default_learner_is_fused():
    assert fh.FeSMIA()._fused
    assert not fh.FeSMIA(method="laplacianshot")._fused
    assert not fh.FeSMIA(method=lambda s, q, shots: q.sum(-1))._fused


def test_non_finite_features_are_refused_with_a_clear_error():
    x = torch.randn(128, 4)
    x[5, 2] = float("nan")
    with pytest.raises(ProbeError, match="NaN or infinite values in 1 of 128 rows"):
        fh.FeSMIA(permutations=9).attack(x, 64)


@needs_numba
def test_splitting_the_permutations_over_threads_changes_nothing():
    x = fused.host_features(features("ties", 7, n=128))
    plan = EpisodePlan(64, 64, shots=5, queries=15, episodes=20, permutations=600, seed=7)
    slots, perms, _ = plan.host()
    flags = plan.query_is_member.numpy()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.simpleshot_readings(x, slots, perms, flags, shots=5, relaxed_fp=4,
                                        num_members=64)
        torch.set_num_threads(3)
        three = fused.simpleshot_readings(x, slots, perms, flags, shots=5, relaxed_fp=4,
                                          num_members=64)
    finally:
        torch.set_num_threads(threads)
    for field in dataclasses.fields(fused.EpisodeReadings):
        a, b = getattr(one, field.name), getattr(three, field.name)
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b, err_msg=field.name)


@pytest.mark.parametrize("compiled", [True, False])
def test_features_that_overflow_the_scores_are_refused_on_both_paths(monkeypatch, compiled):
    if compiled and not HAVE_NUMBA:
        pytest.skip("the compiled loop needs numba")
    monkeypatch.setattr(fused, "HAVE_NUMBA", compiled)
    x = torch.randn(128, 4, dtype=torch.float64) * 1e200
    with pytest.raises(ProbeError, match="non-finite scores"):
        fh.FeSMIA(permutations=9).attack(x, 64)


def test_features_without_columns_are_refused():
    with pytest.raises(ProbeError, match=r"\[canaries, F >= 1\]"):
        fh.FeSMIA(permutations=9).attack(torch.empty(128, 0), 64)


@needs_numba
@pytest.mark.parametrize("kind", ["gaussian", "ties", "duplicates", "saturated"])
@pytest.mark.parametrize("seed", range(6))
def test_compiled_and_reference_pool_rankings_read_the_same(kind, seed):
    n = (16, 64, 128, 37, 200, 9)[seed]
    x = fused.host_features(features(kind, seed, n=n, width=(1, 4, 5, 8, 3, 13)[seed]))
    members = max(2, min(n - 2, n // 2 + seed - 3))
    rng = np.random.default_rng(seed)
    perms = np.stack([np.arange(n)] + [rng.permutation(n) for _ in range(150)])
    got = fused.centroid_readings(x, perms, num_members=members, relaxed_fp=seed % 3)
    ref = fused.centroid_readings_torch(x, perms, members, seed % 3)
    for field in dataclasses.fields(fused.PoolReadings):
        a, b = getattr(got, field.name), getattr(ref, field.name)
        np.testing.assert_array_equal(a, b, err_msg=f"{field.name} ({kind}, seed {seed})")
    # the counts alone (no AUC: O(n), not O(m n), per permutation) are the same counts
    counts = fused.centroid_readings(x, perms, num_members=members, relaxed_fp=seed % 3,
                                     with_auc=False)
    np.testing.assert_array_equal(counts.tp_strict, ref.tp_strict)
    np.testing.assert_array_equal(counts.tp_relaxed, ref.tp_relaxed)
    assert np.isnan(counts.auc).all()


def test_the_pool_ranking_leaves_each_canary_out_of_its_own_centroid():
    # Two members far apart and two non-members between them: with itself in its centroid a
    # member would sit nearer the members' centroid; without it, each is nearer the other side.
    x = torch.tensor([[-4.0], [4.0], [-1.0], [1.0]])
    out = fused.centroid_readings(x, np.arange(4)[None], num_members=2, relaxed_fp=0)
    assert out.auc.tolist() == [0.0] and out.tp_strict.tolist() == [0]
    # a constant pool ties everywhere: AUC one half, no member named
    flat = fused.centroid_readings(torch.ones(8, 3), np.arange(8)[None], num_members=4,
                                   relaxed_fp=1)
    assert flat.auc.tolist() == [0.5] and flat.tp_strict.tolist() == [0]


def test_the_pool_counts_alone_refuse_a_negative_allowance_and_cap_a_large_one():
    x = np.random.default_rng(0).normal(size=(12, 3))
    perms = np.stack([np.random.default_rng(s).permutation(12) for s in range(5)])
    with pytest.raises(fh.ConfigurationError, match="`relaxed_fp` must be an int >= 0, got -1"):
        fused.centroid_readings(x, perms, num_members=6, relaxed_fp=-1, with_auc=False)
    # more false positives allowed than there are non-members: every member is named
    many = fused.centroid_readings(x, perms, num_members=6, relaxed_fp=10**9, with_auc=False)
    assert many.tp_relaxed.tolist() == [6] * 5
    ref = fused.centroid_readings_torch(x, perms, 6, 10**9)
    np.testing.assert_array_equal(many.tp_strict, ref.tp_strict)


def test_the_pool_ranking_needs_two_canaries_on_each_side():
    with pytest.raises(ProbeError, match="at least 2 members and 2 non-members, got 1 of 6"):
        fused.centroid_readings(torch.randn(6, 2), np.arange(6)[None], num_members=1,
                                relaxed_fp=0)


@pytest.mark.parametrize("compiled", [True, False])
def test_features_that_overflow_the_pool_scores_are_refused(compiled, monkeypatch):
    if compiled and not HAVE_NUMBA:
        pytest.skip("the compiled loop needs numba")
    monkeypatch.setattr(fused, "HAVE_NUMBA", compiled)
    x = np.random.default_rng(0).normal(size=(16, 2)) * 1e200
    with pytest.raises(ProbeError, match="non-finite scores"):
        fused.centroid_readings(x, np.arange(16)[None], num_members=8, relaxed_fp=0)


def test_an_alarm_on_the_pool_computes_no_episode_under_the_permutations():
    x = features("gaussian", 1, n=128).double()
    probe = fh.FeSMIA(permutations=49, seed=1)
    probe.use_statistics(["signal_mean", "centroid_strict"])  # the default alarm
    m = probe.attack(x, 64)
    read = [STATISTICS.index(s) for s in ("signal_mean", "centroid_strict")]
    unread = [STATISTICS.index(s) for s in (*EPISODE_STATISTICS, "centroid_auc")]
    assert torch.isfinite(m.null[:, read]).all()
    assert torch.isnan(m.null[:, unread]).all()  # nor the pool's AUC, which it does not read
    # the observed statistics are all there, and the pool's match a full computation
    everything = fh.FeSMIA(permutations=49, seed=1)
    everything.use_statistics(STATISTICS)
    full = everything.attack(x, 64)
    assert m.statistics == full.statistics
    assert torch.equal(m.null[:, read], full.null[:, read])
    pool_cols = [STATISTICS.index(s) for s in POOL_STATISTICS]
    assert torch.isfinite(full.null[:, pool_cols]).all()


def test_the_signal_score_is_the_mean_of_the_oriented_columns_and_label_free():
    x = features("gaussian", 2, n=64).double()
    x[:32] += 0.8  # members higher on every signal
    probe = fh.FeSMIA(permutations=99, seed=2)
    m = probe.attack(x, 32)
    score = x.numpy().mean(1)
    assert m.statistics["signal_mean"] == pytest.approx(score[:32].mean() - score[32:].mean())
    assert fh.Calibration(statistic="signal_mean").single_check(m).p_value <= 0.02
    # only the leading signal columns count: the rest (embeddings) change nothing
    wider = torch.cat([x, torch.randn(64, 3, dtype=torch.float64)], dim=1)
    w = probe.attack(wider, 32, signal_columns=4)
    assert w.statistics["signal_mean"] == m.statistics["signal_mean"]
    # no oriented signal: the statistic reads NaN, and testing it is refused
    none = probe.attack(x, 32, signal_columns=0)
    assert math.isnan(none.statistics["signal_mean"])
    with pytest.raises(fh.ConfigurationError, match="which this check could not compute"):
        fh.Calibration(statistic="signal_mean").single_check(none)


def test_a_probe_of_embeddings_alone_defaults_to_the_episodes_statistic():
    assert fh.FeSMIA().default_statistic == "signal_mean+centroid_strict"
    probe = fh.FeSMIA(features="embeddings", embedding_layer="fc")
    assert probe.default_statistic == "auc+strict"
    assert {"auc", "strict"} <= probe.null_statistics
