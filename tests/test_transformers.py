"""Hugging Face Trainer callback on a tiny randomly initialised GPT-2 (nothing downloaded).

Skipped when ``transformers`` (with ``accelerate``, which its Trainer needs) is not
installed; the test of the missing-package message runs either way.
"""

import json
import subprocess
import sys

import pytest
import torch
from _history import checks_in  # noqa: E402

import fesmia_hooks as fh
from fesmia_hooks.sinks import HISTORY_FILE, scalar_metrics

V = 32


@pytest.fixture
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers


def tiny_gpt2(hf, seed=0):
    config = hf.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                           bos_token_id=0, eos_token_id=0)  # dropout 0.1 everywhere
    torch.manual_seed(seed)
    return hf.GPT2LMHeadModel(config)


def data():
    tokens = torch.randint(0, V, (96, 16), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": row, "labels": row} for row in tokens[:64]]
    canaries = fh.CanarySet.from_sequences(tokens[:32], tokens[64:], vocab_size=V)
    return train, canaries


def train(hf, out, callbacks, *, epochs=3, **overrides):
    train_set, _ = data()
    options = dict(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=16,
                   learning_rate=1e-2, report_to="none", save_strategy="no",
                   logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    options.update(overrides)
    model = tiny_gpt2(hf)
    trainer = hf.Trainer(model=model, args=hf.TrainingArguments(**options),
                         train_dataset=train_set, callbacks=callbacks)
    trainer.train()
    return trainer


def monitor(**kwargs):
    from fesmia_hooks.integrations.transformers import PrivacyMonitor

    _, canaries = data()
    kwargs.setdefault("probe", fh.FeSMIA(episodes=20, permutations=99))
    return PrivacyMonitor(canaries, **kwargs)


def test_the_callback_logs_the_shared_vocabulary_and_the_budget_stops_training(hf, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = monitor(budget=fh.LeakageBudget())
    trainer = train(hf, tmp_path, [callback], epochs=20)
    assert callback.should_stop and callback.stop_reason == fh.StopReason.LEVEL_EXCEEDED
    stopped = callback.stopped_epoch
    assert stopped is not None and trainer.state.epoch == stopped + 1 < 20
    assert [r.epoch for r in callback.history] == list(range(stopped + 1))
    assert callback.history[-1].breached and callback.history[-1].significant
    # trainer.state.log_history carries one entry per check, with scalar_metrics' keys
    logged = [h for h in trainer.state.log_history if "privacy/log_mia_strict" in h]
    assert len(logged) == len(callback.history)
    for entry, report in zip(logged, callback.history, strict=True):
        assert {k: v for k, v in entry.items() if k.startswith("privacy/")} == scalar_metrics(report)
        assert entry["step"] == report.step
    # TensorBoard events and the history, in <output_dir>/privacy
    folder = tmp_path / "privacy"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    strict = events.Scalars("privacy/log_mia_strict")
    assert [e.step for e in strict] == [r.step for r in callback.history]
    assert [e.value for e in strict] == pytest.approx([r.strict for r in callback.history])
    assert {"privacy/scores/members", "privacy/scores/non_members"} <= set(events.Tags()["histograms"])
    assert [line["epoch"] for line in checks_in(folder / HISTORY_FILE)] == list(range(stopped + 1))


def test_a_run_with_the_callback_ends_with_the_same_weights(hf, tmp_path):
    watched = train(hf, tmp_path / "a", [monitor(every_n_steps=2)], epochs=2)
    plain = train(hf, tmp_path / "b", [], epochs=2)
    assert len([h for h in watched.state.log_history if "privacy/auc" in h]) == 4
    for (name, a), b in zip(watched.model.state_dict().items(),
                            plain.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_step_cadence_horizon_and_checkpointed_state(hf, tmp_path):
    callback = monitor(every_n_steps=3)
    train(hf, tmp_path, [callback], epochs=2, save_strategy="steps", save_steps=4)
    assert [r.step for r in callback.history] == [3, 6]
    assert callback.monitor.calibration.horizon == 8 // 3
    saved = json.loads((tmp_path / "checkpoint-4" / "fesmia_monitor_state.json").read_text())
    assert saved["checks"] == 1 and saved["history"][0]["step"] == 3
    resumed = monitor(every_n_steps=3)
    resumed.load_state_dict(saved)
    assert resumed.monitor.checks == 1 and not resumed.monitor.is_due(step=3)


def test_bad_arguments_are_clear(hf):
    with pytest.raises(fh.ConfigurationError, match="`log_dir` must be a path .* got int"):
        monitor(log_dir=3)
    with pytest.raises(fh.ConfigurationError, match="`tensorboard` must be a bool, got 'yes'"):
        monitor(tensorboard="yes")


def test_without_transformers_the_callback_names_the_extra_to_install():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import fesmia_hooks, torch\n"
        "from fesmia_hooks.integrations.transformers import PrivacyMonitor\n"
        "c = fesmia_hooks.CanarySet.from_sequences(torch.ones(20, 4).long(), "
        "torch.zeros(20, 4).long())\n"
        "try:\n"
        "    PrivacyMonitor(c)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'fesmia-hooks[transformers]'" in out.stdout


def test_importing_fesmia_hooks_does_not_import_transformers():
    code = "import sys, fesmia_hooks; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
