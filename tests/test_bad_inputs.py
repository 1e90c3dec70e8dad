"""Bad input across the public API: the documented exception, a message that says what was
received and what is allowed, and nothing half-written. docs/bad_inputs.md lists every case."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fesmia_hooks as fh

DOCS = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


def xy(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def canaries(n=20):
    x, y = xy(2 * n)
    return fh.CanarySet(members=(x[:n], y[:n]), non_members=(x[n:], y[n:]))


def monitor(out, **kwargs):
    return fh.PrivacyMonitor(canaries(), log_dir=out, **kwargs)


def keras_monitor(out, **kwargs):
    from fesmia_hooks.integrations.keras import PrivacyMonitor

    return PrivacyMonitor(canaries(), log_dir=out, **kwargs)


def lightning_monitor(out, **kwargs):
    from fesmia_hooks.integrations.lightning import PrivacyMonitor

    return PrivacyMonitor(canaries(), log_dir=out, **kwargs)


def wrong_keras_backend(out):
    import keras

    from fesmia_hooks.integrations import keras as adapter

    original = keras.backend.backend
    keras.backend.backend = lambda: "jax"
    try:
        return adapter.PrivacyMonitor(canaries(), log_dir=out)
    finally:
        keras.backend.backend = original


def attach_to_epoch_monitor(out):
    from fesmia_hooks.integrations.torch import attach

    model = nn.Linear(4, 3)
    return attach(model, torch.optim.SGD(model.parameters(), lr=0.1), monitor(out))


x, y = xy()
NAN = x.clone()
NAN[3, 1] = float("nan")

CASES = {
    # CanarySet
    "canary-shapes-disagree": (lambda out: fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[20:, :3], y[20:])),
                               fh.CanaryError, r"same sample shape, got \(4,\) and \(3,\)"),
    "canary-dtypes-disagree": (lambda out: fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[20:].double(), y[20:])),
                               fh.CanaryError, "same dtype, got torch.float32 and torch.float64"),
    "canary-float-labels": (lambda out: fh.CanarySet(members=(x[:20], y[:20].float()), non_members=(x[20:], y[20:].float())),
                            fh.CanaryError, "integer class indices, got torch.float32"),
    "canary-label-out-of-range": (lambda out: fh.CanarySet(members=(x[:20], y[:20] + 5), non_members=(x[20:], y[20:]), num_classes=3),
                                  fh.CanaryError, r"must lie in \[0, 3\), got \d+ label\(s\) outside it"),
    "canary-nan-input": (lambda out: fh.CanarySet(members=(NAN[:20], y[:20]), non_members=(x[20:], y[20:])),
                         fh.CanaryError, "must be finite, got 1 sample"),
    "canary-overlap": (lambda out: fh.CanarySet(members=(x[:20], y[:20]), non_members=(x[15:35], y[15:35])),
                       fh.CanaryError, r"5 sample\(s\) appear among both members and non_members"),
    "canary-empty-side": (lambda out: fh.CanarySet(members=(x[:0], y[:0]), non_members=(x, y)),
                          fh.CanaryError, "members must hold at least one sample, got none"),
    "canary-labels-on-one-side": (lambda out: fh.CanarySet(members=(x[:20], y[:20]), non_members=x[20:]),
                                  fh.CanaryError, "labels for both members and non_members, or for neither"),
    "canary-split-too-large": (lambda out: fh.CanarySet.split((x, y), size=30),
                               fh.CanaryError, r"split\(size=30\) needs at least 60 samples, got 40"),
    "canary-too-few-for-probe": (lambda out: monitor(out, probe=fh.FeSMIA(shots=5, queries=20)),
                                 fh.CanaryError, "needs at least 25 members and 25 non-members .* got 20 members"),
    # FeSMIA
    "probe-unknown-method": (lambda out: fh.FeSMIA("knn"), fh.ConfigurationError, "`method` must be one of .*got 'knn'"),
    "probe-zero-shots": (lambda out: fh.FeSMIA(shots=0), fh.ConfigurationError, "`shots` must be a positive int, got 0"),
    "probe-float-queries": (lambda out: fh.FeSMIA(queries=7.5), fh.ConfigurationError, "`queries` must be a positive int, got 7.5"),
    "probe-one-episode": (lambda out: fh.FeSMIA(episodes=1), fh.ConfigurationError, "`episodes` must be an int >= 2, got 1"),
    "probe-unknown-signal": (lambda out: fh.FeSMIA(signals=("phi", "loss")), fh.ConfigurationError, "`signals` must be one of .*got 'loss'"),
    "probe-embeddings-without-layer": (lambda out: fh.FeSMIA(features="both"), fh.ConfigurationError, "needs `embedding_layer`"),
    "calibration-alpha-out-of-range": (lambda out: fh.Calibration(alpha=1.0), fh.ConfigurationError, r"`alpha` must be a number in \(0, 1\), got 1.0"),
    "probe-bad-learner-option": (lambda out: fh.FeSMIA("finetune", learner_options={"lam": 1}), fh.ConfigurationError, r"\['lam'\] are not options of 'finetune'"),
    "probe-bands-out-of-order": (lambda out: fh.LevelBands(moderate=0.6, high=0.5), fh.ConfigurationError, "0 < moderate <= high <= critical <= 1"),
    # LeakageBudget
    "budget-unknown-level": (lambda out: fh.LeakageBudget(max_level="severe"), fh.ConfigurationError, "`max_level` must be one of .*got 'severe'"),
    "budget-unknown-key": (lambda out: fh.LeakageBudget(max_values={"leak": 0.5}), fh.ConfigurationError, "'leak' is not a leakage reading"),
    "budget-threshold-not-a-number": (lambda out: fh.LeakageBudget(max_values={"auc": "0.7"}), fh.ConfigurationError, "must map report keys to numbers, got 'auc': '0.7'"),
    "budget-negative-patience": (lambda out: fh.LeakageBudget(patience=-1), fh.ConfigurationError, "`patience` must be a positive int, got -1"),
    "budget-unknown-action": (lambda out: fh.LeakageBudget(action="email"), fh.ConfigurationError, "`action` must be one of 'alert', 'stop', 'raise', got 'email'"),
    "monitor-alpha-out-of-range": (lambda out: fh.PrivacyMonitor(canaries(), alpha=-0.1), fh.ConfigurationError, r"`alpha` must be a number in \(0, 1\), got -0.1"),
    # PrivacyMonitor
    "monitor-negative-cadence": (lambda out: monitor(out, every_n_epochs=-1), fh.ConfigurationError, "`every_n_epochs` must be a positive int, got -1"),
    "monitor-zero-steps": (lambda out: monitor(out, every_n_steps=0), fh.ConfigurationError, "`every_n_steps` must be a positive int, got 0"),
    "monitor-not-canaries": (lambda out: fh.PrivacyMonitor((x, y), log_dir=out), fh.ConfigurationError, "`canaries` must be a CanarySet or SequenceCanarySet, got tuple"),
    "monitor-bad-on-error": (lambda out: monitor(out, on_error="ignore"), fh.ConfigurationError, "`on_error` must be one of 'warn', 'raise', got 'ignore'"),
    # Adapters
    "keras-wrong-backend": (wrong_keras_backend, fh.ConfigurationError, "needs the 'torch' backend, got 'jax'"),
    "keras-zero-cadence": (lambda out: keras_monitor(out, every_n_epochs=0), fh.ConfigurationError, "`every_n_epochs` must be a positive int, got 0"),
    "lightning-bad-log-dir": (lambda out: lightning_monitor(42), fh.ConfigurationError, "`log_dir` must be a path .* got int"),
    "lightning-negative-cadence": (lambda out: lightning_monitor(out, every_n_epochs=-2), fh.ConfigurationError, "`every_n_epochs` must be a positive int, got -2"),
    "torch-attach-epoch-monitor": (attach_to_epoch_monitor, fh.ConfigurationError, "attach\\(\\) checks by optimizer steps"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_the_documented_error_and_writes_nothing(case, tmp_path):
    build, error, message = CASES[case]
    out = tmp_path / "run"
    with pytest.raises(error, match=message) as caught:
        build(out)
    assert not out.exists()  # nothing half-written
    assert isinstance(caught.value, fh.FesmiaError) and isinstance(caught.value, ValueError)


def test_there_are_at_least_25_cases_and_the_docs_list_each():
    assert len(CASES) >= 25
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOCS.read_text(), flags=re.M))
    assert documented == set(CASES)
