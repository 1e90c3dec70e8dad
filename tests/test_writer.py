"""Outputs off the training thread: queued, in order, flushed when it matters, failures kept."""

import pickle
import threading
import time

import pytest
from _history import checks_in
from test_faults import canaries, monitor, set_weights, unrelated_weights
from torch import nn

from fesmia_hooks import sinks as sinks_module
from fesmia_hooks.writer import BackgroundWriter


class Slow:
    def __init__(self, gate):
        self.gate = gate
        self.calls = []
        self.threads = set()

    def log(self, value):
        self.gate.wait(5)
        self.threads.add(threading.get_ident())
        self.calls.append(value)


def test_calls_run_in_order_on_another_thread_and_flush_waits_for_them():
    gate = threading.Event()
    sink = Slow(gate)
    writer = BackgroundWriter()
    for i in range(5):
        writer.submit(sink, "log", (i,))
    assert sink.calls == []  # queued: the caller did not wait for the sink
    gate.set()
    assert writer.flush()
    assert sink.calls == [0, 1, 2, 3, 4]
    assert threading.get_ident() not in sink.threads


def test_a_full_queue_makes_the_caller_wait_instead_of_growing():
    gate = threading.Event()
    sink = Slow(gate)
    writer = BackgroundWriter(maxsize=2)
    writer.submit(sink, "log", (0,))  # taken by the thread, blocked in the sink
    time.sleep(0.05)
    writer.submit(sink, "log", (1,))
    writer.submit(sink, "log", (2,))  # the queue is full now
    blocked = threading.Thread(target=writer.submit, args=(sink, "log", (3,)))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # waits for room
    gate.set()
    blocked.join(5)
    assert writer.flush() and sink.calls == [0, 1, 2, 3]


def test_a_failing_call_is_kept_for_the_caller_and_later_calls_still_run():
    class Broken:
        def __init__(self):
            self.seen = []

        def log(self, value):
            if value == 1:
                raise OSError(28, "No space left on device")
            self.seen.append(value)

    sink = Broken()
    writer = BackgroundWriter()
    for i in range(3):
        writer.submit(sink, "log", (i,))
    assert writer.flush()
    [(who, hook, error)] = writer.failures()
    assert who is sink and hook == "log" and isinstance(error, OSError)
    assert sink.seen == [0, 2] and writer.failures() == []


def test_flush_gives_up_after_its_timeout_on_a_hung_sink():
    gate = threading.Event()
    writer = BackgroundWriter()
    writer.submit(Slow(gate), "log", (0,))
    assert writer.flush(timeout=0.1) is False
    gate.set()
    assert writer.flush()


def test_a_slow_sink_does_not_hold_back_another_sinks_calls():
    # TensorBoard's histograms must not keep the history file's lines waiting in the queue
    # (a hard kill would lose all of them, not the line in flight).
    gate = threading.Event()
    slow, fast = Slow(gate), Slow(threading.Event())
    fast.gate.set()
    writer = BackgroundWriter()
    for i in range(10):
        writer.submit(slow, "log", (i,))
        writer.submit(fast, "log", (i,))
    deadline = time.monotonic() + 5
    while len(fast.calls) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fast.calls == list(range(10)) and slow.calls == []
    gate.set()
    assert writer.flush() and slow.calls == list(range(10))
    assert slow.threads.isdisjoint(fast.threads)


def test_a_call_queued_while_close_stops_its_thread_is_made_by_the_next_flush():
    sink = Slow(threading.Event())
    sink.gate.set()
    writer = BackgroundWriter()
    lane = writer._lane(sink)  # submit() has taken the lane ...
    writer.close()  # ... when close() stops its thread ...
    lane.queue.put((sink, "log", (1,)))  # ... and then queues its call
    assert writer.flush() and sink.calls == [1]
    writer.close()


def test_replacing_the_log_dir_ends_the_old_sinks_threads(tmp_path):
    canary_set, _ = canaries()
    mon = monitor(canary_set, log_dir=tmp_path / "a")
    model = nn.Linear(8, 3)
    set_weights(model, unrelated_weights())
    writers = lambda: sum(t.name == "fesmia-hooks-writer" for t in threading.enumerate())  # noqa: E731
    before = writers()
    for name in "bcde":
        mon.step(model, epoch=ord(name))
        mon.set_log_dir(tmp_path / name)
    mon.step(model, epoch=99)
    mon.flush()
    assert writers() - before <= 2  # the current folder's two sinks
    mon.close()


def test_a_pickled_writer_is_a_fresh_one():
    gate = threading.Event()
    writer = BackgroundWriter(maxsize=7)
    writer.submit(Slow(gate), "log", (0,))
    copy = pickle.loads(pickle.dumps(writer))
    assert copy.flush(timeout=1) and copy.maxsize == 7 and not copy._lanes
    gate.set()
    assert writer.flush()


@pytest.mark.parametrize("stop", [True, False])
def test_a_monitor_writes_its_history_before_a_stop_returns(tmp_path, stop):
    canary_set, memorised = canaries()
    model = nn.Linear(8, 3)
    set_weights(model, memorised if stop else unrelated_weights())
    mon = monitor(canary_set, log_dir=tmp_path, tensorboard=False)
    gate = threading.Event()
    original = sinks_module.JsonlSink.log

    def slow_log(self, report, step):
        gate.wait(0.5)
        original(self, report, step)

    sinks_module.JsonlSink.log = slow_log
    try:
        report = mon.step(model, epoch=0)
        written = [c["check"] for c in checks_in(tmp_path / "privacy_history.jsonl")] if (
            tmp_path / "privacy_history.jsonl").exists() else []
    finally:
        sinks_module.JsonlSink.log = original
        gate.set()
    assert report.breached is stop
    if stop:
        assert written == [1]  # the stop waited for its line
    else:
        assert written == []  # an ordinary check did not wait for the slow disk
    mon.close()
    assert [c["check"] for c in checks_in(tmp_path / "privacy_history.jsonl")] == [1]


def test_closed_monitors_leave_no_writer_threads_behind(tmp_path):
    canary_set, _ = canaries()
    model = nn.Linear(8, 3)
    before = sum(t.name == "fesmia-hooks-writer" for t in threading.enumerate())
    for i in range(5):
        mon = monitor(canary_set, log_dir=tmp_path / str(i))
        mon.step(model, epoch=0)
        mon.close()
    time.sleep(0.1)
    after = sum(t.name == "fesmia-hooks-writer" for t in threading.enumerate())
    assert after <= before


def test_a_closed_writer_starts_again_on_the_next_call():
    gate = threading.Event()
    gate.set()
    sink = Slow(gate)
    writer = BackgroundWriter()
    writer.submit(sink, "log", (1,))
    assert writer.close()
    writer.submit(sink, "log", (2,))
    assert writer.flush() and sink.calls == [1, 2]
