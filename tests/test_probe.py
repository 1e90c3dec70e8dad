"""FeSMIA: every learner, determinism, model output forms, features, and its arguments."""

import math

import pytest
import torch
from torch import nn

import fesmia_hooks as fh
from fesmia_hooks.learners import LEARNERS
from fesmia_hooks.measurement import STATISTICS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def canaries(n=32, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2 * n, d, generator=g), torch.randint(0, classes, (2 * n,), generator=g)
    return fh.CanarySet(members=(x[:n], y[:n]), non_members=(x[n:], y[n:]), num_classes=classes)


def separable_features(n=32, shift=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2 * n, 4, generator=g)
    f[:n] += shift  # members first, far from non-members
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_every_learner_finds_planted_leakage(method, device):
    probe = fh.FeSMIA(method, episodes=20, permutations=99, seed=0)
    report = fh.Calibration().single_check(probe.attack(separable_features().to(device), 32))
    assert report.strict > 0.9 and report.relaxed > 0.9 and report.auc > 0.95
    assert report.p_value == pytest.approx(1 / 100)
    assert report.significant and report.level == fh.Level.CRITICAL


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_every_learner_stays_near_chance_without_leakage(method):
    probe = fh.FeSMIA(method, episodes=40, permutations=49, seed=0)
    report = fh.Calibration().single_check(probe.attack(separable_features(shift=0.0, seed=3), 32))
    assert abs(report.relaxed - report.chance_relaxed) < 0.15
    assert report.p_value > 0.05 and report.level == fh.Level.NONE


def test_report_fields_and_interval():
    measured = fh.FeSMIA(episodes=40, permutations=49).measure(nn.Linear(6, 3), canaries())
    assert measured.null.shape == (49, len(STATISTICS))  # each statistic of the test, per permutation
    report = fh.Calibration().single_check(measured)
    assert not hasattr(report, "null_statistics")  # the null stays with the measurement
    assert report.strict_low <= report.strict <= report.strict_high
    assert report.relaxed_low <= report.relaxed <= report.relaxed_high
    assert report.chance_strict == pytest.approx(fh.chance_log_mia(15).strict)
    assert set(report.tpr_at_fpr) == {0.0, 0.05, 0.1}
    assert report.strict_low <= report.strict_episode_low <= report.strict_episode_high
    assert len(report.member_scores) + len(report.non_member_scores) <= 64
    assert report.seconds_forward >= 0 and report.seconds_attack > 0
    flat = report.as_dict()
    assert flat["log_mia_strict"] == report.strict and flat["level"] == report.level.value
    assert "15 canary members" in report.summary() and "chance 0.18" in report.summary()


def test_same_seed_same_report_bit_for_bit():
    model, c = nn.Linear(6, 3), canaries()
    pa, pb = (fh.FeSMIA(seed=7, episodes=30, permutations=49) for _ in range(2))
    for probe in (pa, pb):
        probe.use_statistics(STATISTICS)  # the episodes' statistics too
    ma, mb = pa.measure(model, c), pb.measure(model, c)
    assert not ma.null.isnan().any()
    a, b = fh.Calibration().single_check(ma), fh.Calibration().single_check(mb)
    da, db = a.as_dict(), b.as_dict()
    for key in ("seconds_forward", "seconds_attack"):
        da.pop(key), db.pop(key)
    assert da == db
    assert torch.equal(ma.null, mb.null)


class DictModel(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.kind = kind

    def forward(self, x):
        z = self.fc(x)
        if self.kind == "tuple":
            return z, x
        if self.kind == "dict":
            return {"logits": z, "hidden": x}
        if self.kind == "object":
            return type("Out", (), {"logits": z})()
        return z


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "object"])
def test_model_output_forms_give_the_same_report(kind):
    torch.manual_seed(0)
    model = DictModel(kind)
    torch.manual_seed(0)
    plain = DictModel("tensor")
    probe = fh.FeSMIA(episodes=20, permutations=19)
    assert probe.evaluate(model, canaries()).strict == probe.evaluate(plain, canaries()).strict


def test_output_without_logits_is_a_clear_error():
    class Bad(nn.Module):
        def forward(self, x):
            return "nope"

    with pytest.raises(fh.ProbeError, match="holds no logits.*got str"):
        fh.FeSMIA(episodes=5, permutations=9).evaluate(Bad(), canaries())


def test_labels_beyond_the_model_classes_are_a_clear_error():
    with pytest.raises(fh.ProbeError, match=r"canary label\(s\) fall outside the model's 2 classes"):
        fh.FeSMIA(episodes=5, permutations=9).evaluate(nn.Linear(6, 2), canaries(classes=3))


def test_signal_fn_replaces_the_signals():
    calls = []

    def signal_fn(model, x, y):
        calls.append(torch.is_grad_enabled())
        return model(x).max(1).values

    report = fh.FeSMIA(signal_fn=signal_fn, episodes=10, permutations=9).evaluate(
        nn.Linear(6, 3), canaries()
    )
    assert calls == [False] and 0 <= report.strict <= 1


def test_signal_fn_with_a_bad_shape_is_a_clear_error():
    probe = fh.FeSMIA(signal_fn=lambda m, x, y: torch.zeros(3, 2, 2), episodes=5, permutations=9)
    with pytest.raises(fh.ProbeError, match=r"must return \[batch=64, features\], got \(3, 2, 2\)"):
        probe.evaluate(nn.Linear(6, 3), canaries())


@pytest.mark.parametrize("features", ["embeddings", "both"])
def test_embeddings_from_a_named_layer(features):
    model = nn.Sequential(nn.Linear(6, 200), nn.ReLU(), nn.Linear(200, 3))
    probe = fh.FeSMIA(features=features, embedding_layer="1", episodes=10, permutations=9)
    feats = probe.features_of(model, canaries())
    assert feats.embeddings.shape == (64, 200)
    assert (feats.signals is None) == (features == "embeddings")
    matrix = feats.matrix()
    # 200-wide embeddings are rewritten in the 64 points' own span, distances unchanged.
    emb_part = matrix[:, -64:]
    centred = feats.embeddings - feats.embeddings.mean(0)
    normed = centred / centred.norm(dim=1, keepdim=True)
    dist = torch.cdist(emb_part.double(), emb_part.double())
    assert torch.allclose(dist, torch.cdist(normed.double(), normed.double()), atol=1e-5)
    assert not model[1]._forward_hooks  # hook removed
    probe.evaluate(model, canaries())


def test_unknown_layer_names_some_layers():
    model = nn.Sequential(nn.Linear(6, 3))
    probe = fh.FeSMIA(features="embeddings", embedding_layer="fc9", episodes=5, permutations=9)
    with pytest.raises(fh.ConfigurationError, match="'fc9' is not a submodule.*'0'"):
        probe.evaluate(model, canaries())


def test_saturated_model_still_ranks_members_in_log_space():
    # Members at softmax probability exactly 1.0 in float32 still separate by phi.
    logits = torch.zeros(64, 3)
    logits[:32, 0] = torch.linspace(40, 80, 32)
    logits[32:, 0] = torch.linspace(20, 39, 32)
    assert (torch.softmax(logits, 1)[:, 0] == 1.0).sum() >= 40
    signals = fh.classification_signals(logits, torch.zeros(64, dtype=torch.long), ["phi"])
    assert signals[:32].min() > signals[32:].max()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "knn"}, "`method` must be one of 'simpleshot', 'laplacianshot', 'finetune', "
                            "'threshold' or a learner function, got 'knn'"),
        ({"shots": 0}, "`shots` must be a positive int, got 0"),
        ({"queries": -1}, "`queries` must be a positive int, got -1"),
        ({"episodes": 1}, "`episodes` must be an int >= 2, got 1"),
        ({"permutations": 2.5}, "`permutations` must be a positive int, got 2.5"),
        ({"features": "pixels"}, "`features` must be one of 'signals', 'embeddings', 'both', "
                                 "got 'pixels'"),
        ({"features": "embeddings"}, "needs `embedding_layer`"),
        ({"signals": ("phi", "loss")}, "`signals` must be one of .*got 'loss'"),
        ({"signals": "phi"}, "non-empty sequence of signal names, got 'phi'"),
        ({"batch_size": 0}, "`batch_size` must be a positive int, got 0"),
        ({"seed": "x"}, "`seed` must be an int, got 'x'"),
        ({"signal_fn": 3}, "`signal_fn` must be callable, got int"),
        ({"method": "threshold", "threshold_signal": "margin", "signals": ("phi",)},
         "`threshold_signal` must be one of 'phi', got 'margin'"),
        ({"method": "simpleshot", "learner_options": {"epochs": 3}},
         r"\['epochs'\] are not options of 'simpleshot'"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(fh.ConfigurationError, match=message):
        fh.FeSMIA(**kwargs)


def test_learner_options_reach_the_learner():
    probe = fh.FeSMIA("laplacianshot", learner_options={"lam": 0.0}, episodes=20, permutations=9)
    simple = fh.FeSMIA("simpleshot", episodes=20, permutations=9)
    f = separable_features(shift=0.5)
    # With no graph term LaplacianShot ranks exactly as SimpleShot's distances do.
    assert probe.attack(f, 32).strict == pytest.approx(simple.attack(f, 32).strict)


def test_chance_level_is_reported_for_the_queries_used():
    report = fh.FeSMIA(queries=10, episodes=10, permutations=9).attack(separable_features(), 32)
    assert report.chance_relaxed == pytest.approx(fh.chance_log_mia(10).relaxed)
    assert report.queries == 10 and math.isfinite(report.auc)


def test_a_registered_or_passed_learner_is_used_by_name():
    def farthest(support, query, shots, *, scale=1.0):
        return scale * query[..., 0]

    f = separable_features()
    by_function = fh.FeSMIA(farthest, learner_options={"scale": 2.0}, episodes=10,
                            permutations=9)
    assert by_function.method == "farthest"
    fh.register_learner("first_feature", farthest)
    try:
        with pytest.raises(fh.ConfigurationError, match="already registered"):
            fh.register_learner("first_feature", farthest)
        by_name = fh.FeSMIA("first_feature", episodes=10, permutations=9)
        assert by_name.attack(f, 32).strict == by_function.attack(f, 32).strict
    finally:
        del LEARNERS["first_feature"]
    with pytest.raises(fh.ConfigurationError, match=r"\['depth'\] are not options of 'farthest'"):
        fh.FeSMIA(farthest, learner_options={"depth": 3})


def test_any_object_with_the_probe_methods_can_be_a_monitors_probe():
    class Constant:
        def check_canaries(self, canaries):
            pass

        def measure(self, model, canaries):
            return fh.FeSMIA(episodes=5, permutations=9).attack(separable_features(), 32)

        def settings(self):
            return {"method": "constant"}

    assert isinstance(Constant(), fh.Probe)
    monitor = fh.PrivacyMonitor(canaries(), probe=Constant())
    assert monitor.step(nn.Linear(6, 3), epoch=0).strict > 0.9
    assert monitor.header()["settings"]["probe"] == {"method": "constant"}


def test_trajectory_features_add_each_canarys_change_since_earlier_checks():
    probe = fh.FeSMIA(episodes=10, permutations=9, trajectory=2)
    model, c = nn.Linear(6, 3), canaries()
    first = probe._with_trajectory(probe.features_of(model, c))
    assert first.signals.shape[1] == 3 * 4 and torch.all(first.signals[:, 4:] == 0)
    with torch.no_grad():
        model.weight.add_(0.1)
    second = probe._with_trajectory(probe.features_of(model, c))
    now = probe.features_of(model, c).signals
    assert torch.allclose(second.signals[:, :4], now)
    assert torch.allclose(second.signals[:, 4:8], now - first.signals[:, :4])
    assert probe.settings()["trajectory"] == 2
    probe.start_run()  # a new run forgets the old checks
    assert torch.all(probe._with_trajectory(probe.features_of(model, c)).signals[:, 4:] == 0)
    monitor = fh.PrivacyMonitor(c, probe=fh.FeSMIA(episodes=10, permutations=9, trajectory=1))
    assert monitor.step(model, epoch=0) is not None and monitor.step(model, epoch=1) is not None
    monitor.reset()
    assert monitor.probe._past == []
