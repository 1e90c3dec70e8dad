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
    a, b = fast.attack(x, 64), slow.attack(x, 64)
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
