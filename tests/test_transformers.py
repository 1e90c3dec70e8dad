"""Hugging Face Trainer callback on a tiny randomly initialised GPT-2 (nothing downloaded).

Skipped when ``transformers`` (with ``accelerate``, which its Trainer needs) is not
installed; the test of the missing-package message runs either way.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from _history import RecordingSink, checks_in, headers_in, readings  # noqa: E402

import fesmia_hooks as fh
from fesmia_hooks.integrations.transformers import STATE_FILE
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


def make_trainer(hf, out, callbacks, *, epochs=3, trainer_class=None, **overrides):
    train_set, _ = data()
    options = dict(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=16,
                   learning_rate=1e-2, report_to="none", save_strategy="no",
                   logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    options.update(overrides)
    model = tiny_gpt2(hf)
    return (trainer_class or hf.Trainer)(model=model, args=hf.TrainingArguments(**options),
                                         train_dataset=train_set, callbacks=callbacks)


def train(hf, out, callbacks, *, epochs=3, **overrides):
    trainer = make_trainer(hf, out, callbacks, epochs=epochs, **overrides)
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


# ---------------------------------------------------------------------- the Trainer's logging
def trainer_event_dirs(out):
    """Folders of the Trainer's own TensorBoard event files (the callback's are in privacy/)."""
    return sorted({p.parent for p in out.rglob("events.out.tfevents.*")
                   if "privacy" not in p.relative_to(out).parts})


def privacy_entries(trainer):
    return [h for h in trainer.state.log_history if "privacy/log_mia_strict" in h]


def test_privacy_scalars_reach_the_trainers_tensorboard_once_per_check(hf, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = monitor(every_n_steps=2)
    trainer = train(hf, tmp_path, [callback], epochs=2, report_to=["tensorboard"],
                    logging_strategy="steps", logging_steps=1)
    assert callback._trainer is trainer  # found on the call stack
    steps = [r.step for r in callback.history]
    assert steps == [2, 4, 6, 8]
    # log_history: one entry per check, none twice, apart from the loss entries
    logged = privacy_entries(trainer)
    assert [h["step"] for h in logged] == steps
    assert all("loss" not in h for h in logged)
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == list(range(1, 9))
    # the Trainer's own TensorBoard run (report_to) holds them: its rewrite_logs adds train/
    (folder,) = trainer_event_dirs(tmp_path)
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    (tag,) = [t for t in events.Tags()["scalars"] if t.endswith("privacy/log_mia_strict")]
    assert tag == "train/privacy/log_mia_strict"
    strict = events.Scalars(tag)
    assert [e.step for e in strict] == steps
    assert [e.value for e in strict] == pytest.approx([r.strict for r in callback.history])
    p_threshold = events.Scalars("train/privacy/p_threshold")
    assert [e.value for e in p_threshold] == pytest.approx(
        [r.p_threshold for r in callback.history])


@pytest.mark.parametrize("cadence", ["steps", "epoch"])
def test_the_trainers_own_logs_due_at_a_check_are_kept(hf, tmp_path, cadence):
    # Trainer.log (which the check logs through) clears control.should_log; the loss due at
    # the same step or epoch end must still be logged.
    if cadence == "steps":
        callback, logging = monitor(every_n_steps=2), dict(logging_strategy="steps",
                                                           logging_steps=2)
    else:
        callback, logging = monitor(every_n_epochs=1), dict(logging_strategy="epoch")
    trainer = train(hf, tmp_path, [callback], epochs=2, **logging)
    checked = [r.step for r in callback.history]
    assert checked == ([2, 4, 6, 8] if cadence == "steps" else [4, 8])
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == checked
    assert [h["step"] for h in privacy_entries(trainer)] == checked


@pytest.mark.parametrize("max_steps", [5, 6])
def test_a_last_epoch_cut_short_by_max_steps_is_checked(hf, tmp_path, max_steps):
    # 4 steps an epoch: the second epoch ends after 1 or 2 of them (state.epoch 1.25 or 1.5)
    # and is epoch 1, as the horizon (2 checks) counts it.
    callback = monitor(every_n_epochs=1)
    train(hf, tmp_path, [callback], epochs=3, max_steps=max_steps)
    assert [(r.epoch, r.step) for r in callback.history] == [(0, 4), (1, max_steps)]
    assert callback.monitor.calibration.horizon == 2


def test_without_the_trainer_on_the_stack_attach_gives_it(hf, tmp_path, monkeypatch, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fesmia_hooks.integrations import transformers as adapter

    monkeypatch.setattr(adapter, "_calling_trainer", lambda callback: (None, None))
    tb = dict(epochs=1, report_to=["tensorboard"], logging_strategy="no")
    # not found, not attached: a warning, and the values reach log_history only
    lost = monitor(every_n_steps=2)
    with caplog.at_level("WARNING", logger=adapter.__name__):
        trainer = train(hf, tmp_path / "lost", [lost], **tb)
    assert "cannot find its Trainer" in caplog.text and "callback.attach(trainer)" in caplog.text
    assert [h["step"] for h in privacy_entries(trainer)] == [2, 4]
    tags = [t for d in trainer_event_dirs(tmp_path / "lost")
            for t in EventAccumulator(str(d)).Reload().Tags()["scalars"]]
    assert not [t for t in tags if "privacy/" in t]
    # attach(trainer): registered once, and the values go through trainer.log
    callback = monitor(every_n_steps=2)
    trainer = make_trainer(hf, tmp_path / "attached", [], **tb)
    assert callback.attach(trainer) is callback and callback.attach(trainer) is callback
    assert [cb for cb in trainer.callback_handler.callbacks if cb is callback] == [callback]
    caplog.clear()
    trainer.train()
    assert "cannot find its Trainer" not in caplog.text
    assert [h["step"] for h in privacy_entries(trainer)] == [2, 4]
    (folder,) = trainer_event_dirs(tmp_path / "attached")
    strict = EventAccumulator(str(folder)).Reload().Scalars("train/privacy/log_mia_strict")
    assert [e.value for e in strict] == pytest.approx([r.strict for r in callback.history])
    with pytest.raises(fh.ConfigurationError, match=r"`trainer` must have a log\(dict\) method "
                                                    r"\(a transformers.Trainer\), got object"):
        callback.attach(object())


# ---------------------------------------------------------------------- resuming
class Crash(Exception):
    pass


def crash_at(hf, step):
    """A callback standing in for a killed job: raises before optimizer step ``step + 1``."""

    class CrashAt(hf.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(step)

    return CrashAt()




RESUMABLE = dict(epochs=2, save_strategy="steps", save_steps=4)  # 8 steps, checkpoints 4, 8


@pytest.mark.parametrize(("how", "reference_first"), [
    ("latest", True),     # train(resume_from_checkpoint=True)
    ("path", False),      # train(resume_from_checkpoint=".../checkpoint-4")
    ("moved", False),     # the checkpoint moved out of output_dir, resumed from there
    ("manual", True),     # callback.load_state_dict(saved state), then train(resume_...=path)
])
def test_an_interrupted_and_resumed_run_is_the_uninterrupted_run(hf, tmp_path, how,
                                                                  reference_first):
    def reference():
        callback = monitor(every_n_steps=2)
        train(hf, tmp_path / "reference", [callback], **RESUMABLE)
        return callback

    out = tmp_path / "run"
    uninterrupted = reference() if reference_first else None
    first = monitor(every_n_steps=2)
    with pytest.raises(Crash):  # dies before step 7: check 3 (step 6) is past checkpoint-4
        train(hf, out, [first, crash_at(hf, 6)], **RESUMABLE)
    assert [r.step for r in first.history] == [2, 4, 6]
    first.monitor.flush()  # what the interpreter does at exit after a crash
    assert [line["step"] for line in checks_in(out / "privacy" / HISTORY_FILE)] == [2, 4, 6]
    checkpoint = out / "checkpoint-4"
    assert not (out / "checkpoint-8").exists()

    sink = RecordingSink()
    resumed = monitor(every_n_steps=2, sinks=[sink])  # a new callback, as in a new process
    loads = []  # the checks of every state loaded into the new callback
    load = resumed.load_state_dict

    def counted_load(state):
        loads.append(state["checks"])
        load(state)

    resumed.load_state_dict = counted_load
    resume_from = {"latest": True, "path": str(checkpoint), "manual": str(checkpoint)}.get(how)
    if how == "moved":
        resume_from = str(tmp_path / "saved" / "from-the-cluster")
        shutil.move(str(checkpoint), resume_from)
    if how == "manual":
        with open(checkpoint / STATE_FILE) as fh_:
            resumed.load_state_dict(json.load(fh_))
    trainer = make_trainer(hf, out, [resumed], **RESUMABLE)
    trainer.train(resume_from_checkpoint=resume_from)
    if uninterrupted is None:
        uninterrupted = reference()

    assert loads == [2]  # loaded once, never twice
    assert resumed.monitor.run_id == first.monitor.run_id != uninterrupted.monitor.run_id
    assert [r.check for r in resumed.history] == [1, 2, 3, 4]
    assert [readings(r) for r in resumed.history] == [readings(r) for r in uninterrupted.history]
    assert [r.p_threshold for r in resumed.history[2:]] == [
        r.p_threshold for r in uninterrupted.history[2:]]
    # the history file: one header, every check once (check 3 of the crashed run replaced)
    history = out / "privacy" / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(history)] == [first.monitor.run_id]
    lines = checks_in(history)
    assert [(line["check"], line["step"]) for line in lines] == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert {line["run_id"] for line in lines} == {first.monitor.run_id}
    assert [line["log_mia_strict"] for line in lines] == pytest.approx(
        [r.strict for r in uninterrupted.history])
    # log_history: the checkpoint's entries, then the resumed run's, each check once
    assert [h["step"] for h in privacy_entries(trainer)] == [2, 4, 6, 8]
    # the user's sink: told once that the run resumes after check 2, then the new checks
    assert sink.calls[0] == ("resume", first.monitor.run_id, 2)
    assert [c for c in sink.calls if c[0] == "resume"] == [sink.calls[0]]
    assert sink.logged() == [(3, 6), (4, 8)]
    saved = json.loads((out / "checkpoint-8" / STATE_FILE).read_text())
    assert saved["run_id"] == first.monitor.run_id and saved["checks"] == 4


@pytest.mark.parametrize("manual", [False, True])
def test_resuming_with_the_same_trainer_and_callback_after_a_crash(hf, tmp_path, manual):
    # a notebook: the cell dies, and the same objects resume (after loading the state by hand)
    callback = monitor(every_n_steps=2)
    crash = crash_at(hf, 6)
    trainer = make_trainer(hf, tmp_path, [callback, crash], **RESUMABLE)
    with pytest.raises(Crash):
        trainer.train()
    run_id = callback.monitor.run_id
    trainer.remove_callback(crash)
    if manual:
        with open(tmp_path / "checkpoint-4" / STATE_FILE) as fh_:
            callback.load_state_dict(json.load(fh_))
    trainer.train(resume_from_checkpoint=True)
    assert callback.monitor.run_id == run_id
    assert [(r.check, r.step) for r in callback.history] == [(1, 2), (2, 4), (3, 6), (4, 8)]
    history = tmp_path / "privacy" / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(history)] == [run_id]
    assert [(line["check"], line["step"]) for line in checks_in(history)] == [
        (1, 2), (2, 4), (3, 6), (4, 8)]
    assert [h["step"] for h in privacy_entries(trainer)] == [2, 4, 6, 8]


def test_resuming_without_the_monitors_state_warns_and_starts_a_new_run(hf, tmp_path, caplog):
    first = monitor(every_n_steps=2)
    with pytest.raises(Crash):
        train(hf, tmp_path, [first, crash_at(hf, 6)], **RESUMABLE)
    (tmp_path / "checkpoint-4" / STATE_FILE).unlink()
    resumed = monitor(every_n_steps=2)
    with caplog.at_level("WARNING", logger="fesmia_hooks.integrations.transformers"):
        make_trainer(hf, tmp_path, [resumed], **RESUMABLE).train(resume_from_checkpoint=True)
    assert "resuming at step 4 without the monitor's state" in caplog.text
    assert resumed.monitor.run_id != first.monitor.run_id
    assert [(r.check, r.step) for r in resumed.history] == [(1, 6), (2, 8)]


# ---------------------------------------------------------------------- run-start rule
def test_a_second_train_with_the_same_callback_is_a_new_run(hf, tmp_path):
    callback = monitor(budget=fh.LeakageBudget())
    seen = []

    class AtStart(hf.TrainerCallback):  # runs after the monitor's on_train_begin
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append((callback.monitor.run_id, len(callback.history), callback.should_stop,
                         callback.stopped_epoch, callback.stop_reason))

    trainer = train(hf, tmp_path, [callback, AtStart()], epochs=20)
    first_run, first_stop = callback.monitor.run_id, callback.stopped_epoch
    assert callback.should_stop and first_stop is not None
    assert len(callback.history) == first_stop + 1
    trainer.train()  # the same trainer and callback, no resume
    second_run = callback.monitor.run_id
    assert seen == [(first_run, 0, False, None, fh.StopReason.NOT_STOPPED),
                    (second_run, 0, False, None, fh.StopReason.NOT_STOPPED)]
    assert second_run != first_run
    assert callback.history[0].check == 1 and callback.history[0].epoch == 0
    history = tmp_path / "privacy" / HISTORY_FILE
    assert [h["run_id"] for h in headers_in(history)] == [first_run, second_run]
    by_run = {run: [line["check"] for line in checks_in(history) if line["run_id"] == run]
              for run in (first_run, second_run)}
    assert by_run == {first_run: list(range(1, first_stop + 2)),
                      second_run: list(range(1, len(callback.history) + 1))}


# ---------------------------------------------------------------------- sinks
def test_a_users_sink_receives_every_check_on_the_main_process_only(hf, tmp_path):
    sink = RecordingSink()
    callback = monitor(every_n_steps=2, sinks=[sink])
    train(hf, tmp_path / "main", [callback], epochs=2)
    run_id = callback.monitor.run_id
    assert sink.calls[0] == ("start_run", run_id)
    assert sink.logged() == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert sink.calls[-1] == ("close",)

    class NotMain(hf.Trainer):  # what every process but the first sees
        def is_world_process_zero(self):
            return False

    other = RecordingSink()
    callback = monitor(every_n_steps=2, sinks=[other])
    trainer = train(hf, tmp_path / "other", [callback], epochs=2, trainer_class=NotMain)
    assert not trainer.state.is_world_process_zero
    assert [r.step for r in callback.history] == [2, 4, 6, 8]  # it checks all the same
    assert [c for c in other.calls if c[0] != "close"] == []
    assert not (tmp_path / "other" / "privacy").exists()


def test_the_check_of_an_epoch_a_checkpoint_ended_is_made_at_resume(hf, tmp_path):
    # save_steps = steps per epoch: checkpoint-4 is saved at epoch 0's last step, before
    # on_epoch_end, so it holds epoch 0's weights but not its check.
    reference = monitor()
    train(hf, tmp_path / "reference", [reference], **RESUMABLE)
    out = tmp_path / "run"
    first = monitor()
    with pytest.raises(Crash):
        train(hf, out, [first, crash_at(hf, 6)], **RESUMABLE)
    first.monitor.flush()
    saved = json.loads((out / "checkpoint-4" / STATE_FILE).read_text())
    assert saved["checks"] == 0  # the epoch-0 check came after the save
    resumed = monitor()
    make_trainer(hf, out, [resumed], **RESUMABLE).train(
        resume_from_checkpoint=str(out / "checkpoint-4"))
    assert [r.epoch for r in resumed.history] == [0, 1]
    assert [readings(r) for r in resumed.history] == [readings(r) for r in reference.history]
    assert [line["epoch"] for line in checks_in(out / "privacy" / HISTORY_FILE)] == [0, 1]


def test_the_last_asynchronous_check_reaches_the_trainers_log(hf, tmp_path):
    callback = monitor(asynchronous=True)
    trainer = train(hf, tmp_path, [callback])
    assert len(privacy_entries(trainer)) == len(callback.history) == 3
