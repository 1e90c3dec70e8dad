"""Fault injection: the library tried as a hostile user (and a hostile machine) would.

Three promises are held against every fault below:

* no history line is lost (other runs' lines, failed checks, lines of a resumed run);
* the stop is applied when due (stop state, ``stopped_epoch``, safe weights, ``raise``),
  whatever the outputs and the user's callbacks do;
* no canary value appears in any output: the history file (and ``.unreadable``), warnings,
  log records, exception messages, the monitor's ``state_dict``, TensorBoard event files and
  the report table of :func:`fesmia_hooks.history.format_table`.

The canaries carry planted values: every input holds ``987.25`` in a column the models never
read, and sequence canaries hold the token id ``987``. :func:`leaks` finds them in any text.

Tests named ``test_guard_*`` depend on the extension of :mod:`fesmia_hooks.guard` (forked
numpy/Python generators, buffers written in eval mode put back, lazy modules refused).
Tests marked ``xfail(strict=True)`` would document library bugs found here: they pass once fixed,
and then the marker must go.
"""

import copy
import datetime
import errno
import functools
import json
import logging
import os
import random
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _history import checks_in, headers_in, lines_of, spawn_or_fail
from torch import nn

import fesmia_hooks as fh
import fesmia_hooks.sinks as sinks_module
from fesmia_hooks.history import format_table, load_runs
from fesmia_hooks.sinks import HISTORY_FILE, JsonlSink, TensorBoardSink

CANARY = 987.25
CANARY_TOKEN = 987
# A planted value as any writer would print it: 987, 987.25, 987.2500, -987.25, 9.8725e+02;
# not 0.987..., 1987 or a hex id such as a987b.
_LEAK = re.compile(r"(?<![\w.])987(?!\d)|9\.87250*e")
_BINARY = (struct.pack("<f", CANARY), struct.pack("<d", CANARY))


def leaks(text):
    """The planted canary values found in ``text``."""
    return _LEAK.findall(text)


def assert_clean(*texts):
    for text in texts:
        found = leaks(text)
        assert not found, f"a canary value {found} appears in an output:\n{text[:2000]}"


# ------------------------------------------------------------------------------- fixtures
def canaries(seed=0):
    """64 random canaries and the weights that 'memorise' the members.

    Column 7 of every input is the planted value; the weights read nothing there. The
    members' labels are what those weights predict, the non-members' are not: a model with
    those weights tells them apart perfectly, one with other weights cannot.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    x[:, 7] = CANARY
    memorised = torch.randn(3, 8, generator=g)
    memorised[:, 7] = 0
    y = (x @ memorised.T).argmax(1)
    y[32:] = (y[32:] + 1) % 3
    return fh.CanarySet(members=(x[:32], y[:32]), non_members=(x[32:], y[32:])), memorised


def unrelated_weights():
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(123))
    w[:, 7] = 0
    return w


def set_weights(linear, weight):
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.zero_()


def probe(**kwargs):
    return fh.FeSMIA(episodes=10, permutations=99, **kwargs)


def monitor(canary_set, *, action="stop", on_breach=None, probe_=None, **kwargs):
    """A monitor whose every check can alarm (99 permutations, horizon 4)."""
    kwargs.setdefault("tensorboard", False)
    budget = fh.LeakageBudget(max_level="none", action=action, on_breach=on_breach)
    return fh.PrivacyMonitor(canary_set, probe=probe_ or probe(), budget=budget, horizon=4,
                             **kwargs)


def state_of(model):
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def failing_open(suffix):
    """``open`` that fails, disk full, for writes to files whose name ends with ``suffix``."""
    real = open

    def fake(path, mode="r", *args, **kwargs):
        if str(path).endswith(suffix) and any(m in mode for m in "aw+"):
            disk_full()
        return real(path, mode, *args, **kwargs)

    return fake


def refuse_writes(patch, suffix):
    """The disk refuses (full) every write to files whose name ends with ``suffix``.

    Both ways a sink opens a file for writing: Python's ``open`` and ``os.open``.
    """
    patch.setattr(sinks_module, "open", failing_open(suffix), raising=False)
    real = os.open

    def fake(path, flags, *args, **kwargs):
        if str(path).endswith(suffix) and flags & (os.O_WRONLY | os.O_RDWR):
            disk_full()
        return real(path, flags, *args, **kwargs)

    patch.setattr(os, "open", fake)


class Messages:
    """The messages of the warnings caught so far (read live, inside the block too)."""

    def __init__(self, caught):
        self._caught = caught

    def __iter__(self):
        return iter([str(w.message) for w in self._caught])


@contextmanager
def recording():
    """Every warning raised inside, as :class:`Messages`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield Messages(caught)


def tensorboard_output(folder):
    """Every event of the folder's event files as text, and their raw bytes."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    texts, raw = [], b""
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        raw += path.read_bytes()
        texts.extend(str(event) for event in EventFileLoader(str(path)).Load())
    return "\n".join(texts), raw


def scalar_steps(folder, tag):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == tag for v in event.summary.value):
                steps.append(event.step)
    return steps


def outputs(folder, monitors, messages, caplog):
    """Every text the library wrote: files, tables, states, warnings and log records."""
    texts = [*messages, caplog.text]
    texts += [json.dumps(m.state_dict()) for m in monitors]
    texts += [json.dumps(m.errors) + "\n".join(m.output_errors) for m in monitors]
    if folder is not None:
        folder = Path(folder)
        texts += [p.read_text(errors="replace") for p in sorted(folder.rglob("*.jsonl*"))
                  if p.is_file() and not p.name.endswith(".lock")]
        if list(folder.rglob(HISTORY_FILE)):
            texts += [format_table(run) for run in load_runs(folder)]
        events, raw = tensorboard_output(folder)
        texts.append(events)
        assert not any(b in raw for b in _BINARY), "a canary value is in an event file"
    return texts


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    """Log records (the check summaries at INFO too) are outputs searched for canaries."""
    caplog.set_level(logging.INFO, logger="fesmia_hooks")


def test_the_leak_detector_sees_the_planted_values():
    """The searches below are not vacuous: every way the canaries print is caught."""
    canary_set, _ = canaries()
    assert bool((canary_set.inputs[:, 7] == CANARY).all())
    for text in (str(canary_set.inputs), json.dumps(canary_set.inputs.tolist()),
                 f"{CANARY:.1f}", f"{CANARY:e}", "index 987 is out", "[12, 987, 3]"):
        assert leaks(text), text
    for text in ("0.987654", "1987", "run a987bc", "p = 0.0987", "9870"):
        assert not leaks(text), text


# ------------------------------------------------------------- 1. a full disk, a broken writer
@pytest.mark.parametrize("fault", ["JsonlSink.write", "open"])
def test_a_full_disk_during_a_breaching_check_keeps_the_stop_and_safe_weights(
    tmp_path, monkeypatch, caplog, fault
):
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, log_dir=tmp_path, restore_safe_weights=True)
    with recording() as messages:
        first = mon.step(model, epoch=0)
        assert first is not None and not first.breached
        mon.flush()  # check 1 is on disk before the disk fills
        safe = state_of(model)
        set_weights(model, memorised)  # training: the model now memorises its members
        with monkeypatch.context() as patch:
            if fault == "open":
                refuse_writes(patch, HISTORY_FILE)
            else:
                patch.setattr(JsonlSink, "write", disk_full)
            report = mon.step(model, epoch=1)  # the run is not killed
        assert report is not None and report.breached and report.action == "stop"
        assert mon.should_stop and mon.stopped_epoch == 1
        assert mon.stop_reason is fh.StopReason.LEVEL_EXCEEDED
        assert same_state(model.state_dict(), safe)  # the safe weights are back
        failure = [m for m in messages if "JsonlSink.log failed" in m]
        assert failure and "No space left on device" in failure[0]
        assert mon.output_errors == failure
        # The disk works again: later checks reach the file; the first stop stays the stop.
        set_weights(model, memorised)
        assert mon.step(model, epoch=2).breached
    assert mon.stopped_epoch == 1
    written = [c["check"] for c in checks_in(tmp_path / HISTORY_FILE)]
    assert 1 in written and written[-1] == 3
    assert [r.check for r in mon.history] == [1, 2, 3]
    assert [h["check"] for h in mon.state_dict()["history"]] == [1, 2, 3]
    assert_clean(*outputs(tmp_path, [mon], messages, caplog))


def test_a_failing_tensorboard_write_is_reported_and_the_stop_still_applies(
    tmp_path, monkeypatch, caplog
):
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, log_dir=tmp_path, tensorboard=True, restore_safe_weights=True)
    with recording() as messages:
        mon.step(model, epoch=0)
        mon.flush()  # check 1's event is written before the disk fills
        safe = state_of(model)
        set_weights(model, memorised)
        with monkeypatch.context() as patch:
            patch.setattr(TensorBoardSink, "log", disk_full)
            assert mon.step(model, epoch=1).breached
        assert mon.should_stop and mon.stopped_epoch == 1
        assert same_state(model.state_dict(), safe)
        assert any("TensorBoardSink.log failed" in m and "No space left on device" in m
                   for m in messages)
        # The history file got the check the event file could not.
        assert [c["check"] for c in checks_in(tmp_path / HISTORY_FILE)] == [1, 2]
        set_weights(model, memorised)
        mon.step(model, epoch=2)  # TensorBoard works again
        mon.close()
    assert scalar_steps(tmp_path, "privacy/log_mia_strict") == [0, 2]
    assert_clean(*outputs(tmp_path, [mon], messages, caplog))


def test_lines_refused_by_a_full_disk_reach_the_file_once_it_works(tmp_path, monkeypatch):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, log_dir=tmp_path)
    with recording():
        with monkeypatch.context() as patch:  # the disk refuses the header and check 1
            refuse_writes(patch, HISTORY_FILE)
            mon.step(model, epoch=0)
        mon.step(model, epoch=1)  # the disk works again: the lines waiting come first
        mon.flush()
    [run] = load_runs(tmp_path)
    assert run.settings.get("budget", {}).get("max_level") == "none"  # the header is there
    assert [r["check"] for r in run.records] == [1, 2]


@pytest.mark.parametrize("fault", ["torn", "fsync"])
def test_a_write_that_fails_half_way_leaves_no_duplicate_and_no_torn_line(tmp_path, fault):
    # The disk fills half-way through a line, or the sync fails after the bytes went out:
    # the failed attempt is cut back off, and the retry writes each line once, whole.
    sink = JsonlSink(tmp_path / HISTORY_FILE)
    sink.start_run({"run_id": "r1", "settings": {}})
    sink.write({"check": 1})
    real_write, real_fsync = os.write, os.fsync

    def half(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        disk_full()

    def failed_sync(fd):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.MonkeyPatch.context() as patch:
        if fault == "torn":
            patch.setattr(os, "write", half)
        else:
            patch.setattr(os, "fsync", failed_sync)
        with pytest.raises(OSError):
            sink.write({"check": 2})
    assert [c["check"] for c in checks_in(sink.path)] == [1]
    sink.write({"check": 3})
    sink.close()
    lines = sink.path.read_text().splitlines()
    assert [json.loads(line).get("check") for line in lines] == [None, 1, 2, 3]
    assert real_write is os.write and real_fsync is os.fsync


def test_an_interrupt_half_way_through_a_line_leaves_no_torn_line(tmp_path):
    sink = JsonlSink(tmp_path / HISTORY_FILE)
    sink.write({"check": 1})
    real_write = os.write

    def interrupted(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sink.write({"check": 2})
    sink.write({"check": 3})
    sink.close()
    assert [json.loads(line)["check"] for line in sink.path.read_text().splitlines()] == [1, 2, 3]


def test_a_new_history_file_gets_the_mode_open_would_give_it(tmp_path):
    old = os.umask(0o002)
    try:
        sink = JsonlSink(tmp_path / HISTORY_FILE)
        sink.write({"check": 1})
        with open(tmp_path / "by_open", "a"):
            pass
    finally:
        os.umask(old)
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    assert mode(sink.path) == mode(tmp_path / "by_open") == 0o664


def test_a_resume_drops_waiting_lines_of_the_checks_it_will_make_again(tmp_path):
    sink = JsonlSink(tmp_path / HISTORY_FILE)
    sink.start_run({"run_id": "r1", "settings": {}})
    for check in (1, 2, 3):
        sink.write({"check": check})
    with pytest.MonkeyPatch.context() as patch:
        refuse_writes(patch, HISTORY_FILE)
        with pytest.raises(OSError):
            sink.write({"check": 4})  # refused, waiting
    sink.resume("r1", 3)  # the state saved after check 3: check 4 will be made again
    sink.write({"check": 4})
    sink.close()
    assert [c["check"] for c in checks_in(sink.path)] == [1, 2, 3, 4]


def test_lines_refused_until_the_end_are_written_when_the_sink_closes(tmp_path):
    sink = JsonlSink(tmp_path / HISTORY_FILE)
    sink.start_run({"run_id": "r1", "settings": {}})
    with pytest.MonkeyPatch.context() as patch:
        refuse_writes(patch, HISTORY_FILE)
        with pytest.raises(OSError):
            sink.write({"check": 1})  # the stop's line, say: refused
    sink.close()  # the disk works again by the end of the run
    assert [c["check"] for c in checks_in(sink.path)] == [1]


# ---------------------------------------------------------- 2. unwritable and file-shaped folders
def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.mark.parametrize("where", ["an existing file", "below a file", "a read-only folder"])
def test_an_unwritable_log_dir_is_refused_at_construction_and_nothing_is_made(tmp_path, where):
    canary_set, _ = canaries()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    if where == "an existing file":
        log_dir, named = blocker, blocker
    elif where == "below a file":
        log_dir, named = blocker / "runs" / "a", blocker
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        named = tmp_path / "read-only"
        named.mkdir()
        log_dir = named / "runs"
    before = listing(tmp_path)
    try:
        if where == "a read-only folder":
            named.chmod(0o500)
        with pytest.raises(fh.ConfigurationError, match=re.escape(str(named))):
            monitor(canary_set, log_dir=log_dir, tensorboard=True)
        assert listing(tmp_path) == before
    finally:
        if where == "a read-only folder":
            named.chmod(0o700)
    assert blocker.read_text() == "keep me"


def test_moving_a_monitor_to_an_unwritable_folder_keeps_the_old_one(tmp_path):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    good = tmp_path / "good"
    mon = monitor(canary_set, log_dir=good)
    mon.step(model, epoch=0)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    with pytest.raises(fh.ConfigurationError, match=re.escape(str(blocker))):
        mon.set_log_dir(blocker / "runs")
    mon.step(model, epoch=1)
    mon.flush()
    assert [c["check"] for c in checks_in(good / HISTORY_FILE)] == [1, 2]
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "notes.txt"]


# ------------------------------------------------------ 3. a user's sink and callback that raise
class BrokenSink:
    """A user's dashboard sink that is down."""

    def __init__(self):
        self.calls = 0

    def log(self, report, step):
        self.calls += 1
        raise ConnectionError("dashboard unreachable")

    def close(self):
        pass


def test_a_failing_user_sink_and_callback_are_reported_and_the_stop_applies(tmp_path, caplog):
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised)
    seen = []

    def pager(report, decision):
        seen.append((report.check, mon.should_stop, mon.stopped_epoch))
        raise ConnectionError("pager down")

    sink = BrokenSink()
    mon = monitor(canary_set, log_dir=tmp_path, sinks=[sink], on_breach=pager)
    with recording() as messages:
        report = mon.step(model, epoch=0)
    assert report.breached and sink.calls == 1
    assert seen == [(1, True, 0)]  # the stop was set before the callback ran
    assert mon.should_stop and mon.stopped_epoch == 0
    assert any("BrokenSink.log failed" in m and "dashboard unreachable" in m for m in messages)
    assert any("on_breach callback" in m and "pager" in m and "pager down" in m
               for m in messages)
    assert len(mon.output_errors) == 2
    [line] = checks_in(tmp_path / HISTORY_FILE)  # the other sinks still wrote
    assert line["breached"] and line["action"] == "stop"
    assert_clean(*outputs(tmp_path, [mon], messages, caplog))


def test_raise_still_raises_when_every_output_and_callback_fails(tmp_path, monkeypatch, caplog):
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised)
    seen = []

    def pager(report, decision):
        seen.append(mon.should_stop)
        raise RuntimeError("pager down")

    mon = monitor(canary_set, action="raise", log_dir=tmp_path, sinks=[BrokenSink()],
                  on_breach=pager)
    monkeypatch.setattr(JsonlSink, "write", disk_full)
    with recording() as messages, pytest.raises(fh.PrivacyBudgetExceeded) as err:
        mon.step(model, epoch=0)
    assert err.value.report.breached and err.value.report.check == 1
    assert seen == [True] and mon.should_stop and mon.stopped_epoch == 0
    for failed in ("JsonlSink.start_run failed", "JsonlSink.log failed", "BrokenSink.log failed",
                   "on_breach callback"):
        assert any(failed in m for m in messages), failed
    monkeypatch.undo()
    assert_clean(str(err.value), *outputs(tmp_path, [mon], messages, caplog))


def test_an_interrupt_inside_on_breach_propagates_after_the_stop_is_set(tmp_path):
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised)

    def interrupted(report, decision):
        raise KeyboardInterrupt

    mon = monitor(canary_set, log_dir=tmp_path, on_breach=interrupted)
    with pytest.raises(KeyboardInterrupt):
        mon.step(model, epoch=0)
    assert mon.should_stop and mon.stopped_epoch == 0
    assert [c["check"] for c in checks_in(tmp_path / HISTORY_FILE)] == [1]


# ------------------------------------------------------------------------ 4. interrupted check
class Interrupting(fh.FeSMIA):
    """A probe interrupted (Ctrl-C, a scheduler's SIGTERM) during its first measure."""

    def __init__(self, exc):
        super().__init__(episodes=10, permutations=99)
        self.exc, self.calls = exc, 0

    def measure(self, model, canaries):
        self.calls += 1
        if self.calls == 1:
            raise self.exc
        return super().measure(model, canaries)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_check_propagates_and_is_run_again(tmp_path, exc):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, probe_=Interrupting(exc()), log_dir=tmp_path)
    with pytest.raises(exc):
        mon.step(model, epoch=0)
    assert mon.checks == 0 and mon.errors == [] and mon.history == []
    assert mon.is_due(epoch=0)  # not marked as checked
    history = tmp_path / HISTORY_FILE
    assert not history.exists() or checks_in(history) == []
    report = mon.step(model, epoch=0)  # the retry runs the check
    assert report is not None and report.check == 1 and report.epoch == 0
    assert mon.step(model, epoch=0) is None  # and now it is done
    mon.flush()
    assert [(c["check"], c["epoch"]) for c in checks_in(history)] == [(1, 0)]
    assert len(headers_in(history)) == 1


def test_an_interrupt_inside_the_models_forward_leaves_training_as_it_was():
    canary_set, _ = canaries()

    class Interrupted(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 3), nn.Dropout(0.5))

        def forward(self, x):
            torch.rand(3)  # draws, then the user presses Ctrl-C
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = Interrupted().train()
    weights, rng = state_of(model), torch.get_rng_state()
    mon = monitor(canary_set)
    with pytest.raises(KeyboardInterrupt):
        mon.step(model, epoch=0)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng) and same_state(model.state_dict(), weights)
    assert mon.is_due(epoch=0) and mon.errors == []


# ------------------------------------------------------------ 5. corrupt and foreign history lines
class Switchable(nn.Module):
    """A linear model whose forward fails while ``broken``."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        set_weights(self.fc, weight)
        self.broken = False

    def forward(self, x):
        if self.broken:
            raise RuntimeError("sensor offline")
        return self.fc(x)


def test_a_resume_keeps_other_runs_and_its_failures_and_moves_garbage_aside(tmp_path, caplog):
    canary_set, _ = canaries()
    model = Switchable(unrelated_weights())
    history = tmp_path / HISTORY_FILE
    with recording() as messages:
        other = monitor(canary_set, log_dir=tmp_path)  # another run, earlier in this folder
        other.step(model, epoch=0)
        other.step(model, epoch=1)
        other.close()
        mine = monitor(canary_set, log_dir=tmp_path)
        mine.step(model, epoch=0)  # check 1
        model.broken = True
        mine.step(model, epoch=1)  # a failed check (numbered 2: the counter moves on success)
        model.broken = False
        mine.step(model, epoch=2)  # check 2
        saved = json.loads(json.dumps(mine.state_dict()))  # the checkpoint
        mine.step(model, epoch=3)  # check 3, after the checkpoint
        model.broken = True
        mine.step(model, epoch=4)  # a failure after the checkpoint
        model.broken = False
        mine.close()  # the process dies ...
        with open(history, "a") as f:
            f.write("this is {not json\n")  # ... after a write went wrong
        theirs = [line for line in history.read_text().splitlines() if other.run_id in line]
        assert len(theirs) == 3
        resumed = monitor(canary_set, log_dir=tmp_path)
        with caplog.at_level(logging.WARNING, logger="fesmia_hooks"):
            resumed.load_state_dict(saved)
        assert "1 unreadable line(s) moved to" in caplog.text
        assert (tmp_path / (HISTORY_FILE + ".unreadable")).read_text() == "this is {not json\n"
        for epoch in (2, 3, 4):
            resumed.step(model, epoch=epoch)  # epoch 2 was checked before the checkpoint
        resumed.flush()
    assert [line for line in history.read_text().splitlines() if other.run_id in line] == theirs
    own = [line for line in lines_of(history) if line.get("run_id") == mine.run_id]
    assert len(own) == len(lines_of(history)) - len(theirs)  # every line is one run's or other's
    assert [line.get("record") for line in own].count("run") == 1
    done = [(c["check"], c["epoch"]) for c in own if "check" in c and "error" not in c]
    assert done == [(1, 0), (2, 2), (3, 3), (4, 4)]
    failed = [(c["check"], c["epoch"], c["error"]) for c in own if "error" in c]
    assert failed == [(2, 1, "RuntimeError: sensor offline")]
    runs = {run.run_id: run for run in load_runs(tmp_path)}
    assert runs.keys() == {other.run_id, mine.run_id}
    assert [r["epoch"] for r in runs[other.run_id].records] == [0, 1]
    assert [r["epoch"] for r in runs[mine.run_id].records] == [0, 2, 3, 4]
    assert [e["epoch"] for e in runs[mine.run_id].errors] == [1]
    assert "check failed: RuntimeError: sensor offline" in format_table(runs[mine.run_id])
    assert_clean(*outputs(tmp_path, [resumed], messages, caplog))


def test_a_resume_moves_json_that_is_not_a_record_aside(tmp_path):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, log_dir=tmp_path)
    mon.step(model, epoch=0)
    saved = mon.state_dict()
    mon.close()
    with open(tmp_path / HISTORY_FILE, "a") as f:
        f.write('[1, 2]\n"half a line"\n')
    resumed = monitor(canary_set, log_dir=tmp_path)
    resumed.load_state_dict(saved)
    resumed.step(model, epoch=1)
    resumed.flush()
    [run] = load_runs(tmp_path)
    assert [r["check"] for r in run.records] == [1, 2]


def test_a_resume_refused_by_a_full_disk_leaves_no_duplicate_checks(tmp_path, monkeypatch):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    first = monitor(canary_set, log_dir=tmp_path)
    for epoch in range(2):
        first.step(model, epoch=epoch)
    saved = first.state_dict()
    first.step(model, epoch=2)  # written after the checkpoint
    first.close()
    resumed = monitor(canary_set, log_dir=tmp_path)
    with recording() as messages:
        with monkeypatch.context() as patch:
            patch.setattr(sinks_module, "open", failing_open(".tmp"), raising=False)
            resumed.load_state_dict(saved)
        assert any("JsonlSink.resume failed" in m for m in messages)
        for epoch in (2, 3):
            resumed.step(model, epoch=epoch)
        resumed.flush()
    assert [c["check"] for c in checks_in(tmp_path / HISTORY_FILE)] == [1, 2, 3, 4]


# ----------------------------------------------------------------- 6. two monitors on one folder
def test_two_monitors_on_one_folder_are_warned_and_kept_apart(tmp_path, caplog):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    history = tmp_path / HISTORY_FILE
    with recording() as messages:
        a = monitor(canary_set, log_dir=tmp_path)
        b = monitor(canary_set, log_dir=tmp_path)
        a.step(model, epoch=0)
        assert not any("another monitor" in m for m in messages)
        b.step(model, epoch=0)
        warned = [m for m in messages if "another monitor is writing" in m]
        assert len(warned) == 1 and HISTORY_FILE in warned[0] and str(tmp_path) in warned[0]
        saved_a = a.state_dict()  # a's checkpoint, after its check 1
        a.step(model, epoch=1)
        b.step(model, epoch=1)
        b.step(model, epoch=2)
        a.close()  # a dies
        b.flush()
        b_lines = [line for line in history.read_text().splitlines() if b.run_id in line]
        assert len(b_lines) == 4 and len(headers_in(history)) == 2
        a2 = monitor(canary_set, log_dir=tmp_path)
        a2.load_state_dict(saved_a)  # b still writes, and b's lines stay
        a2.step(model, epoch=1)
        a2.flush()
        b.step(model, epoch=3)
        b.flush()
    lines = history.read_text().splitlines()
    assert [line for line in lines if b.run_id in line] == [*b_lines, lines[-1]]
    by_run = {}
    for line in lines_of(history):
        by_run.setdefault(line["run_id"], []).append(line)
    assert by_run.keys() == {a.run_id, b.run_id}
    for run_id, checks in ((a.run_id, [1, 2]), (b.run_id, [1, 2, 3, 4])):
        assert by_run[run_id][0]["record"] == "run"  # each run opens with its header
        assert [c["check"] for c in by_run[run_id][1:]] == checks
    assert {run.run_id: len(run.records) for run in load_runs(tmp_path)} == {
        a.run_id: 2, b.run_id: 4}
    assert_clean(*outputs(tmp_path, [a2, b], messages, caplog))


def test_a_writer_that_comes_after_another_closed_is_still_warned(tmp_path):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    with recording() as messages:
        a = monitor(canary_set, log_dir=tmp_path)
        b = monitor(canary_set, log_dir=tmp_path)
        a.step(model, epoch=0)
        b.step(model, epoch=0)  # warned: a holds the folder
        a.close()  # a ends; b goes on writing
        c = monitor(canary_set, log_dir=tmp_path)
        c.step(model, epoch=0)
        b.step(model, epoch=1)
    assert len([m for m in messages if "another monitor is writing" in m]) == 2


# -------------------------------------------------------- 7. a state that is not this monitor's
FOREIGN = {
    # name: what the refusal says
    "not a dict": "must be a dict from state_dict",
    "a string": r"must be a dict from state_dict\(\), got str",
    "a newer version": "version 3",
    "no version": "version None",
    "a bool version": "version True",
    "unknown keys": r"unknown keys \['weights'\]",
    "a history that is no list": "'history' must be a list",
    "another shots": r"differs in \['shots'\]",
    "another canary set": "another canary set",
    "another permutations": "tested with 199 label permutations but this monitor's probe draws 99",
}


@functools.cache
def foreign_state(name):
    """A state a monitor must refuse, as JSON text (built by a real monitor where it can be)."""
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())

    def state(canary_set=canary_set, probe_=None):
        other = monitor(canary_set, probe_=probe_)
        other.step(model, epoch=0)
        other.step(model, epoch=1)
        return json.loads(json.dumps(other.state_dict()))

    built = {
        "another shots": lambda: state(probe_=probe(shots=4)),
        "another canary set": lambda: state(canaries(seed=1)[0]),
        "another permutations": lambda: state(probe_=fh.FeSMIA(episodes=10, permutations=199)),
    }
    if name in built:
        return json.dumps(built[name]())
    good = state()
    return json.dumps({
        "not a dict": list(good.items()),
        "a string": json.dumps(good),
        "a newer version": {**good, "version": 3},
        "no version": {k: v for k, v in good.items() if k != "version"},
        "a bool version": {**good, "version": True},
        "unknown keys": {**good, "weights": [CANARY]},
        "a history that is no list": {**good, "history": {"1": {}}},
    }[name])




def watched_monitor(folder):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    mon = monitor(canary_set, log_dir=folder)
    mon.step(model, epoch=0)
    mon.step(model, epoch=1)
    mon.flush()
    return mon, model


@pytest.mark.parametrize("name", FOREIGN)
def test_a_foreign_state_is_refused_and_the_history_file_is_untouched(tmp_path, name):
    state = json.loads(foreign_state(name))
    mon, _ = watched_monitor(tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file())
    with pytest.raises(fh.ConfigurationError, match=FOREIGN[name]) as err:
        mon.load_state_dict(state)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file()) == before
    assert_clean(str(err.value))


@pytest.mark.parametrize("name", FOREIGN)
def test_a_foreign_state_is_refused_before_anything_is_touched(tmp_path, name):
    state = json.loads(foreign_state(name))
    mon, model = watched_monitor(tmp_path)
    before = json.dumps(mon.state_dict())
    with pytest.raises(fh.ConfigurationError):
        mon.load_state_dict(state)
    assert json.dumps(mon.state_dict()) == before
    assert mon.step(model, epoch=1) is None  # still knows epoch 1 is done
    mon.step(model, epoch=2)
    mon.flush()
    assert {line["run_id"] for line in lines_of(tmp_path / HISTORY_FILE)} == {mon.run_id}
    assert [c["check"] for c in checks_in(tmp_path / HISTORY_FILE)] == [1, 2, 3]


# ------------------------------------------------------------- 8. ranks that probe differently
def disagreeing_worker(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        canary_set, _ = canaries(seed=rank)  # each rank another canary set, of one size
        mon = monitor(canary_set, log_dir=os.path.join(folder, "run") if rank == 0 else None)
        model = nn.Linear(8, 3)
        outcome = {"raised": None, "message": ""}
        try:
            mon.step(model, epoch=0)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            outcome = {"raised": type(exc).__name__, "message": str(exc)}
        outcome.update(checks=mon.checks, errors=mon.errors, due=mon.is_due(epoch=0))
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(outcome, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_with_different_canaries_all_raise_without_hanging(tmp_path):
    spawn_or_fail(disagreeing_worker, (2, str(tmp_path)),
                  hang="a rank hung on a canary set the other ranks do not share")
    for rank in range(2):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["raised"] == "ConfigurationError", outcome
        assert "the processes of this run disagree on the canary set" in outcome["message"]
        assert f"rank {rank} of 2" in outcome["message"]
        assert outcome["checks"] == 0 and outcome["errors"] == [] and outcome["due"]
        assert_clean(outcome["message"])
    history = tmp_path / "run" / HISTORY_FILE
    assert not history.exists() or checks_in(history) == []


# ----------------------------------------------------------- 9. module state that is no tensor
class WithExtraState(nn.Module):
    """A model keeping plain-Python state through get_extra_state / set_extra_state."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        set_weights(self.fc, weight)
        self.meta = {"seen": 0, "tags": ["start"]}

    def forward(self, x):
        return self.fc(x)

    def get_extra_state(self):
        return self.meta  # the live dict: training mutates it in place

    def set_extra_state(self, state):
        self.meta = copy.deepcopy(state)


def test_restore_safe_weights_brings_back_tensors_and_extra_state():
    canary_set, memorised = canaries()
    model = WithExtraState(unrelated_weights())
    mon = monitor(canary_set, restore_safe_weights=True)
    assert not mon.step(model, epoch=0).breached
    safe_weight = model.fc.weight.detach().clone()
    model.meta["seen"] = 5  # training moves on, in place
    model.meta["tags"].append("epoch 1")
    set_weights(model.fc, memorised)
    with recording():
        assert mon.step(model, epoch=1).breached
    assert mon.should_stop and mon.stopped_epoch == 1
    assert torch.equal(model.fc.weight, safe_weight) and not model.fc.bias.any()
    assert model.meta == {"seen": 0, "tags": ["start"]}


def test_a_second_restore_brings_back_the_same_extra_state():
    canary_set, memorised = canaries()

    class Keeping(WithExtraState):
        def set_extra_state(self, state):
            self.meta = state  # a user's module that keeps what it is given

    model = Keeping(unrelated_weights())
    mon = monitor(canary_set, restore_safe_weights=True)
    mon.step(model, epoch=0)
    set_weights(model.fc, memorised)
    with recording():
        mon.step(model, epoch=1)  # restored: model.meta is now the given object
        model.meta["seen"] = 9  # training goes on (the loop ignored the stop)
        set_weights(model.fc, memorised)
        mon.step(model, epoch=2)  # breached again: restored again
    assert model.meta == {"seen": 0, "tags": ["start"]}


# ------------------------------------------------------ 10. (guard-dependent) hostile forwards
class Recorder(nn.Module):
    """Writes buffers in eval mode: a canary row, a counter, and a rebound buffer."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        set_weights(self.fc, weight)
        self.register_buffer("last_seen", torch.zeros(8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_batch", torch.zeros(1, 8))

    def forward(self, x):
        self.last_seen.copy_(x[0])  # the canary row lands in the model
        self.calls += 1
        self.last_batch = x[:1].clone()  # rebinds the buffer
        return self.fc(x)


def test_guard_buffers_written_in_eval_mode_are_put_back():
    """Depends on the guard extension: buffers written in eval mode are restored."""
    canary_set, _ = canaries()
    model = Recorder(unrelated_weights()).train()
    original = model.last_batch
    before = state_of(model)
    mon = monitor(canary_set)
    assert mon.step(model, epoch=0) is not None
    assert same_state(model.state_dict(), before)
    assert model.last_batch is original and model.training
    assert_clean(repr(model.state_dict()), repr(state_of(model)))


def test_guard_a_large_buffer_written_in_eval_mode_fails_the_check_by_name(caplog):
    """Depends on the guard extension: a large buffer cannot be put back and is named."""
    canary_set, _ = canaries()

    class BigCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)
            self.register_buffer("big", torch.zeros(400_000))  # 1.6 MB: not copied

        def forward(self, x):
            self.big[:8].copy_(x[0])
            return self.fc(x)

    mon = monitor(canary_set)
    with recording() as messages:
        assert mon.step(BigCache(), epoch=0) is None
    [error] = mon.errors
    assert error["error"].startswith("ProbeError: the model's forward wrote buffer 'big'")
    assert any("check failed at epoch 0 and was skipped: ProbeError" in m for m in messages)
    assert_clean(*outputs(None, [mon], messages, caplog))


def test_guard_an_uninitialised_lazy_model_is_refused_untouched():
    """Depends on the guard extension: lazy modules are refused before any forward."""
    canary_set, _ = canaries()
    model = nn.Sequential(nn.LazyLinear(3))
    mon = monitor(canary_set)
    with recording() as messages:
        assert mon.step(model, epoch=0) is None
    assert model[0].has_uninitialized_params()  # the canaries did not shape it
    assert any("uninitialised lazy modules (LazyLinear at '0')" in m for m in messages)
    assert "run one training step" in mon.errors[0]["error"]
    strict = monitor(canary_set, on_error="raise")
    with pytest.raises(fh.ConfigurationError, match="uninitialised lazy modules"):
        strict.step(model, epoch=0)
    assert model[0].has_uninitialized_params()


def test_guard_numpy_and_python_draws_in_forward_leave_training_draws_alone():
    """Depends on the guard extension: numpy's and Python's generators are forked."""
    canary_set, _ = canaries()

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            jitter = float(np.random.rand()) + random.random() + float(torch.rand(()))
            return self.fc(x) + 0.0 * jitter

    def draws():
        return float(np.random.rand()), random.random(), float(torch.rand(()))

    def seeded():
        np.random.seed(5)
        random.seed(5)
        torch.manual_seed(5)

    model = Noisy().train()
    seeded()
    expected = draws()
    seeded()
    assert monitor(canary_set).step(model, epoch=0) is not None
    assert draws() == expected and model.training


# ------------------------------------------------------------------------- 11. error messages
class OutOfTable(nn.Module):
    """Looks a row up by an input value: the planted 987.25 is out of the table's range."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.table = torch.zeros(50, 3)

    def forward(self, x):
        return self.fc(x) + self.table[x[:, 7].long()]


def test_an_index_error_keeps_its_words_and_withholds_its_numbers(tmp_path, caplog):
    canary_set, _ = canaries()
    with pytest.raises(IndexError, match="index 987 is out of bounds"):  # what torch says
        OutOfTable()(canary_set.inputs)
    mon = monitor(canary_set, log_dir=tmp_path)
    with recording() as messages:
        assert mon.step(OutOfTable(), epoch=0) is None
    expected = "IndexError: index # is out of bounds for dimension # with size #"
    assert any(expected in m for m in messages)
    assert mon.errors[0]["error"] == expected
    [line] = checks_in(tmp_path / HISTORY_FILE)
    assert line["error"] == expected
    [run] = load_runs(tmp_path)
    assert f"check failed: {expected}" in format_table(run)
    assert_clean(*outputs(tmp_path, [mon], messages, caplog))


def test_a_sequence_canarys_token_id_never_shows(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (64, 12), generator=g)
    ids[:, 3] = CANARY_TOKEN
    canary_set = fh.SequenceCanarySet(ids[:32], ids[32:])

    class SmallTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.zeros(50, 4)
            self.head = nn.Linear(4, 1000)

        def forward(self, input_ids):
            return self.head(self.table[input_ids])

    with pytest.raises(IndexError, match="index 987 is out of bounds"):
        SmallTable()(ids)
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(1000, 4), nn.Linear(4, 1000))
    mon = monitor(canary_set, log_dir=tmp_path, tensorboard=True)
    with recording() as messages:
        assert mon.step(SmallTable(), epoch=0) is None
        assert mon.step(lm, epoch=1) is not None
        mon.close()
    assert "index # is out of bounds" in mon.errors[0]["error"]
    assert len(checks_in(tmp_path / HISTORY_FILE)) == 2
    assert_clean(*outputs(tmp_path, [mon], messages, caplog))


def test_a_shape_error_keeps_its_shapes_and_only_its_first_line(tmp_path, caplog):
    canary_set, _ = canaries()

    class Talkative(nn.Module):
        def forward(self, x):
            raise RuntimeError(f"the model failed on this batch\n{x}")

    mon = monitor(canary_set, log_dir=tmp_path)
    with recording() as messages:
        assert mon.step(nn.Linear(4, 3), epoch=0) is None
        assert mon.step(Talkative(), epoch=1) is None
    shapes = "RuntimeError: mat1 and mat2 shapes cannot be multiplied (64x8 and 4x3)"
    assert any(shapes in m for m in messages) and mon.errors[0]["error"] == shapes
    assert mon.errors[1]["error"] == "RuntimeError: the model failed on this batch"
    assert [c["error"] for c in checks_in(tmp_path / HISTORY_FILE)] == [
        shapes, "RuntimeError: the model failed on this batch"]
    assert_clean(*outputs(tmp_path, [mon], messages, caplog))


def test_an_on_breach_error_is_described_like_a_sink_error():
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised)

    def pager(report, decision):
        raise IndexError(f"index 987 is out of bounds\n{canary_set.inputs[:2]}")

    mon = monitor(canary_set, on_breach=pager)
    with recording() as messages:
        mon.step(model, epoch=0)
    assert_clean(*messages, *mon.output_errors)


@pytest.mark.parametrize("error", ["value", "assert"])
def test_an_error_quoting_a_canary_value_does_not_reach_the_outputs(tmp_path, error):
    canary_set, _ = canaries()

    class Checking(nn.Module):
        def forward(self, x):
            if error == "value":
                raise ValueError(f"input out of range: {x.max().item()}")
            assert x.abs().max() < 100, f"input too large: {x.abs().max()}"
            return x[:, :3]

    mon = monitor(canary_set, log_dir=tmp_path)
    with recording() as messages:
        assert mon.step(Checking(), epoch=0) is None
    assert_clean(*messages, (tmp_path / HISTORY_FILE).read_text())


def test_words_of_text_canaries_are_withheld_from_a_models_error(tmp_path):
    vocab = sorted(set("abcdefghijklmnopqrstuvwxyz "))
    encode = lambda text: [vocab.index(c) for c in text]  # noqa: E731
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    members = [encode(f"member {c} alice smith lives at elm street") for c in "abcdefghij" * 2]
    others = [encode(f"other {c} bob jones lives on oak avenue") for c in "klmnopqrst" * 2]
    members = [m + encode(" " * i) for i, m in enumerate(members)]  # all distinct
    others = [o + encode(" " * i) for i, o in enumerate(others)]
    canary_set = fh.SequenceCanarySet(members, others, vocab_size=len(vocab), decode=decode)

    class Quoting(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Embedding(len(vocab), len(vocab))

        def forward(self, ids):
            raise RuntimeError("cannot read the batch starting " + decode(ids[0].tolist()))

    mon = fh.PrivacyMonitor(canary_set, probe=fh.FeSMIA(episodes=5, permutations=9),
                            log_dir=tmp_path, preflight="off", tensorboard=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.step(Quoting(), epoch=0)
        mon.close()
    said = " ".join(str(w.message) for w in caught) + (tmp_path / HISTORY_FILE).read_text()
    assert "cannot read the batch starting" in said  # the error's own words stay
    for word in ("alice", "smith", "elm", "street"):
        assert word not in said
