"""Bad input across the public API: the documented exception, a message that says what was
received and what is allowed, and nothing half-written. docs/bad_inputs.md lists every case."""

import re
from fractions import Fraction
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


def file_in_the_way(out):
    """A file where a folder is needed (next to ``out``, which must stay absent)."""
    blocker = out.parent / "a_file"
    blocker.write_text("not a folder")
    return blocker


def loaded(out, state):
    return monitor(out).load_state_dict(state)


def from_sparse(out):
    return fh.CanarySet(members=(x[:20].to_sparse(), y[:20]),
                        non_members=(x[20:].to_sparse(), y[20:]))


def duplicated_rows(out):
    doubled = (torch.cat([x, x]), torch.cat([y, y]))
    return fh.CanarySet.split(doubled, size=20, seed=0)


def tokens(n=10, length=8, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g)


def history_file(out, text):
    path = out.parent / "history.jsonl"
    path.write_text(text)
    from fesmia_hooks.history import read_history

    return read_history(path)


def two_arguments(out, fn):
    return fn()


def audit_file(out, name, value):
    """``value`` saved with torch.save as ``name`` next to ``out``; the path."""
    path = out.parent / name
    if value is not None:
        torch.save(value, path)
    else:
        path.write_text("not a model")
    return path


def audit_cli():
    from fesmia_hooks import audit_cli as module

    return module


MORE_CASES = {
    # CanarySet: what cannot be canaries
    "canary-meta-device": (lambda out: fh.CanarySet(members=(torch.empty(20, 4, device="meta"), y[:20]), non_members=(x[20:], y[20:])),
                           fh.CanaryError, "'meta' device"),
    "canary-sparse": (from_sparse, fh.CanaryError, r"to_dense\(\)"),
    "canary-soft-labels": (lambda out: fh.CanarySet(members=(x[:20], torch.full((20, 3), 1 / 3)), non_members=(x[20:], torch.full((20, 3), 1 / 3))),
                           fh.CanaryError, "one-hot"),
    "canary-negative-labels": (lambda out: fh.CanarySet(members=(x[:20], y[:20] - 5), non_members=(x[20:], y[20:])),
                               fh.CanaryError, r"class indices >= 0, got \d+ negative label"),
    "canary-from-the-training-set": (lambda out: fh.CanarySet.from_datasets((x, y), (x, y), size=10),
                                     fh.CanaryError, "train"),
    "canary-split-duplicate-rows": (duplicated_rows, fh.CanaryError, "deduplicate"),
    "canary-crafted-one-class": (lambda out: fh.CanarySet.crafted((x, y), num_classes=1, size=5),
                                 fh.ConfigurationError, r"`num_classes` must be an int >= 2, got 1"),
    # SequenceCanarySet
    "sequence-float-ids": (lambda out: fh.SequenceCanarySet(tokens().float(), tokens(seed=1).float()),
                           fh.CanaryError, "integer token ids, got torch.float32"),
    "sequence-out-of-vocabulary": (lambda out: fh.SequenceCanarySet(tokens() + 100, tokens(seed=1), vocab_size=50),
                                   fh.CanaryError, r"must lie in \[0, 50\), got \d+ id\(s\) outside it"),
    "sequence-too-short": (lambda out: fh.SequenceCanarySet([[5]], [[1, 2, 3]]),
                           fh.CanaryError, "at least 2 unmasked tokens"),
    "sequence-bad-mask": (lambda out: fh.SequenceCanarySet({"input_ids": tokens(), "attention_mask": torch.full((10, 8), 2)}, tokens(seed=1)),
                          fh.CanaryError, "attention_mask must hold only 0 and 1"),
    "sequence-overlap": (lambda out: fh.SequenceCanarySet(tokens(), tokens()),
                         fh.CanaryError, "appear among both members and non_members"),
    "sequence-pad-outside-vocabulary": (lambda out: fh.SequenceCanarySet(tokens(), tokens(seed=1), pad_token_id=60, vocab_size=50),
                                        fh.CanaryError, r"`pad_token_id` must lie in \[0, 50\), got 60"),
    # FeSMIA and learners
    "probe-zero-permutations": (lambda out: fh.FeSMIA(permutations=0), fh.ConfigurationError, "`permutations` must be a positive int"),
    "probe-zero-batch": (lambda out: fh.FeSMIA(batch_size=0), fh.ConfigurationError, "`batch_size` must be a positive int, got 0"),
    "probe-float-seed": (lambda out: fh.FeSMIA(seed=1.5), fh.ConfigurationError, "`seed` must be an int, got 1.5"),
    "probe-signal-fn-not-callable": (lambda out: fh.FeSMIA(signal_fn="phi"), fh.ConfigurationError, "`signal_fn` must be callable, got str"),
    "probe-threshold-on-embeddings": (lambda out: fh.FeSMIA("threshold", features="embeddings", embedding_layer="0"),
                                      fh.ConfigurationError, "method='threshold' reads one signal"),
    "learner-name-taken": (lambda out: fh.register_learner("simpleshot", lambda s, q, k: q[..., 0]),
                           fh.ConfigurationError, "'simpleshot' is already registered"),
    "learner-not-callable": (lambda out: fh.register_learner("mine", 3), fh.ConfigurationError, "a learner must be callable, got int"),
    # Calibration and levels
    "calibration-unknown-statistic": (lambda out: fh.Calibration(statistic="auc+loss"), fh.ConfigurationError, "`statistic` must be one of"),
    "calibration-zero-horizon": (lambda out: fh.Calibration(horizon=0), fh.ConfigurationError, "`horizon` must be a positive int, got 0"),
    "bands-zero": (lambda out: fh.LevelBands(moderate=0.0), fh.ConfigurationError, "0 < moderate"),
    "bands-unknown-reading": (lambda out: fh.LevelBands(on="auc"), fh.ConfigurationError, "`on` must be one of 'strict', 'relaxed', got 'auc'"),
    # LeakageBudget
    "budget-critical-ceiling": (lambda out: fh.LeakageBudget(max_level="critical"), fh.ConfigurationError, "'critical' can never be exceeded"),
    "budget-no-ceiling": (lambda out: fh.LeakageBudget(max_level=None), fh.ConfigurationError, "needs `max_level` or `max_values`, got neither"),
    "budget-on-breach-not-callable": (lambda out: fh.LeakageBudget(on_breach=[print, "x"]), fh.ConfigurationError, "`on_breach` must hold callables, got str"),
    "budget-zero-min-checks": (lambda out: fh.LeakageBudget(min_checks=0), fh.ConfigurationError, "`min_checks` must be a positive int, got 0"),
    # PrivacyMonitor: folders, sinks, options, states
    "monitor-log-dir-is-a-file": (lambda out: fh.PrivacyMonitor(canaries(), log_dir=file_in_the_way(out)),
                                  fh.ConfigurationError, "`log_dir` must be a folder, got an existing file"),
    "monitor-log-dir-under-a-file": (lambda out: fh.PrivacyMonitor(canaries(), log_dir=file_in_the_way(out) / "run"),
                                     fh.ConfigurationError, "`log_dir` cannot be created: .* is a file"),
    "monitor-single-sink": (lambda out: monitor(out, sinks=fh.NullSink()), fh.ConfigurationError, "`sinks` must be a sequence of sinks, got a single NullSink"),
    "monitor-bad-sink": (lambda out: monitor(out, sinks=[object()]), fh.ConfigurationError, r"each sink needs log\(report, step\) and close\(\), got object"),
    "monitor-bad-probe": (lambda out: monitor(out, probe="simpleshot"), fh.ConfigurationError, "`probe` must be a FeSMIA"),
    "monitor-unknown-preflight": (lambda out: monitor(out, preflight="maybe"), fh.ConfigurationError, "`preflight` must be one of 'error', 'warn', 'off', got 'maybe'"),
    "monitor-tensorboard-not-bool": (lambda out: monitor(out, tensorboard="yes"), fh.ConfigurationError, "`tensorboard` must be a bool, got 'yes'"),
    "monitor-restore-not-bool": (lambda out: monitor(out, restore_safe_weights=1), fh.ConfigurationError, "`restore_safe_weights` must be a bool, got 1"),
    "monitor-state-not-a-dict": (lambda out: loaded(out, [1, 2]), fh.ConfigurationError, r"must be a dict from state_dict\(\), got list"),
    "monitor-state-wrong-version": (lambda out: loaded(out, {"version": 9}), fh.ConfigurationError, "version 9; this fesmia-hooks reads versions 1 to 2"),
    "monitor-state-foreign-keys": (lambda out: loaded(out, {"version": 2, "optimizer": {}}), fh.ConfigurationError, r"unknown keys \['optimizer'\]"),
    "monitor-check-without-canaries": (lambda out: fh.PrivacyMonitor(None, log_dir=out).check(nn.Linear(4, 3), epoch=0),
                                       fh.ConfigurationError, "the monitor has no canaries"),
    # the adapters' shared driver
    "driver-monitor-and-options": (lambda out: lightning_monitor(out, monitor=fh.PrivacyMonitor(canaries())),
                                   fh.ConfigurationError, "give a ready `monitor` or the options to build one, got both"),
    "driver-factory-without-colon": (lambda out: __import__("fesmia_hooks.integrations.driver", fromlist=["x"]).load_canaries("factory"),
                                     fh.ConfigurationError, "must be 'package.module:function', got 'factory'"),
    "keras-unknown-log-key": (lambda out: keras_monitor(out, log_keys=["leak"]), fh.ConfigurationError, "leak"),
    "torch-attach-not-a-module": (lambda out: __import__("fesmia_hooks.integrations.torch", fromlist=["x"]).attach("model", None, monitor(out, every_n_steps=1)),
                                  fh.ConfigurationError, "`model` must be a torch.nn.Module, got str"),
    "torch-attach-no-step-hooks": (lambda out: __import__("fesmia_hooks.integrations.torch", fromlist=["x"]).attach(nn.Linear(4, 3), HooklessOptimizer(), fh.PrivacyMonitor(canaries(), every_n_steps=1)),
                                   fh.ConfigurationError, "attach\\(\\) needs an optimizer that takes step hooks"),
    "torch-attach-zero-total-steps": (lambda out: __import__("fesmia_hooks.integrations.torch", fromlist=["x"]).attach(nn.Linear(4, 3), torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1), fh.PrivacyMonitor(canaries(), every_n_steps=1), total_steps=0),
                                      fh.ConfigurationError, "`total_steps` must be a positive int, got 0"),
    # histories and the measure itself
    "history-not-json": (lambda out: history_file(out, "{not json\n{}\n"), ValueError, r"line 1 is not valid JSON"),
    "history-unknown-record": (lambda out: history_file(out, '{"record": "party", "run_id": "a"}\n'), ValueError, "unknown record 'party'"),
    "log-mia-lengths-disagree": (lambda out: fh.log_mia([0.1, 0.2], [True]), fh.ConfigurationError, "must have the same length, got 2 and 1"),
    "log-mia-one-side": (lambda out: fh.log_mia([0.1, 0.2], [True, True]), fh.ConfigurationError, "at least one member and one non-member"),
    "chance-zero-queries": (lambda out: fh.chance_log_mia(0), fh.ConfigurationError, "`queries` must be a positive int, got 0"),
    "sequence-signals-bad-k": (lambda out: fh.SequenceSignals(k=0), fh.ConfigurationError, r"`k` must be a number in \(0, 1\], got 0"),
    "sequence-signals-unknown": (lambda out: fh.SequenceSignals(("loss",)), fh.ConfigurationError, "unknown sequence signal"),
    # fesmia-hooks audit: models and samples read from files
    "audit-unknown-model-format": (lambda out: audit_cli().detect_format(audit_file(out, "model.onnx", None)),
                                   fh.ConfigurationError, "cannot tell the format of a .onnx file; give --format"),
    "audit-state-dict-without-factory": (lambda out: audit_cli().load_model(audit_file(out, "weights.pt", nn.Linear(4, 3).state_dict())),
                                         fh.ConfigurationError, "is not TorchScript .* give --factory"),
    "audit-factory-not-importable": (lambda out: audit_cli().resolve("no_such_module_xyz:build", "--factory"),
                                     fh.ConfigurationError, "cannot be imported: no module named 'no_such_module_xyz'"),
    "audit-pickled-samples": (lambda out: audit_cli().load_samples(audit_file(out, "suspects.pt", {"inputs": x, "labels": Fraction(1, 3)})),
                              fh.CanaryError, r"holds pickled Python objects \(fractions.Fraction\), which loading with weights_only=True refuses"),
    "audit-samples-without-labels": (lambda out: audit_cli().load_samples(audit_file(out, "suspects.pt", x)),
                                     fh.CanaryError, "inputs without labels: a classifier's samples need labels"),
}
CASES.update(MORE_CASES)

#: Where each case's name prefix points, for the docs table.
class HooklessOptimizer(torch.optim.Optimizer):
    """An Optimizer that skips ``Optimizer.__init__`` (so it has no hook registry) and wraps
    no other optimizer: what a DPOptimizer would be without ``original_optimizer``."""

    def __init__(self):  # noqa: D107 - deliberately not calling super().__init__
        self.param_groups = []

    def step(self, closure=None):
        return None


WHERE = {
    "canary": "CanarySet", "sequence": "SequenceCanarySet", "probe": "FeSMIA",
    "learner": "register_learner", "calibration": "Calibration", "bands": "LevelBands",
    "budget": "LeakageBudget", "monitor": "PrivacyMonitor", "driver": "integrations.driver",
    "keras": "integrations.keras", "lightning": "integrations.lightning",
    "torch": "integrations.torch", "history": "history", "log": "log_mia",
    "chance": "chance_log_mia", "audit": "fesmia-hooks audit",
}
WHERE_SEQUENCE_SIGNALS = "text.SequenceSignals"


def where(case):
    if case.startswith("sequence-signals"):
        return WHERE_SEQUENCE_SIGNALS
    return WHERE[case.split("-")[0]]


def raised(case, tmp_path):
    build, error, _ = CASES[case]
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    try:
        build(out)
    except Exception as exc:  # noqa: BLE001 - the message is what we document
        return exc, out
    raise AssertionError(f"{case}: nothing was raised")


def table_row(case, exc, tmp_path):
    message = str(exc).replace(str(tmp_path), "<tmp>").replace("|", "\\|")
    return f"| `{case}` | {where(case)} | `{type(exc).__name__}` | {type(exc).__name__}: {message} |"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_the_documented_error_and_writes_nothing(case, tmp_path):
    build, error, message = CASES[case]
    out = tmp_path / "run"
    with pytest.raises(error, match=message) as caught:
        build(out)
    assert not out.exists()  # nothing half-written
    assert isinstance(caught.value, fh.FesmiaError) and isinstance(caught.value, ValueError)


def test_there_are_at_least_60_cases_and_the_docs_list_each_as_it_reads(tmp_path):
    assert len(CASES) >= 60
    text = DOCS.read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M))
    assert documented == set(CASES)
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines()
            if line.startswith("| `")}
    for case in CASES:  # the table is what the code says today
        exc, _ = raised(case, tmp_path / case)
        assert rows[case] == table_row(case, exc, tmp_path / case), case


def write_docs(tmp_path):
    """Regenerate docs/bad_inputs.md: ``python tests/test_bad_inputs.py``."""
    head = DOCS.read_text().split("| case |")[0]
    rows = []
    for case in sorted(CASES, key=lambda c: (list(WHERE).index(c.split("-")[0])
                                             if c.split("-")[0] in WHERE else 99, c)):
        folder = tmp_path / case
        exc, _ = raised(case, folder)
        rows.append(table_row(case, exc, folder))
    DOCS.write_text(head + "| case | where | exception | message |\n|---|---|---|---|\n"
                    + "\n".join(rows) + "\n")


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("KERAS_BACKEND", "torch")  # as the test suite runs it

    write_docs(Path(tempfile.mkdtemp()))
