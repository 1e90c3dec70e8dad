"""Outputs off the training thread: one background writer per monitor.

Writing a check's outputs (a TensorBoard event, a histogram, a text summary, an fsynced
history line) takes longer than the statistics. A :class:`BackgroundWriter` calls the
monitor's own sinks (the history file and TensorBoard of its ``log_dir``) from daemon
threads, one per sink, each sink's calls in the order the monitor asked, through bounded
queues: a check returns as soon as its outputs are queued, and only a sink more than
:data:`QUEUE_SIZE` calls behind makes training wait. One thread per sink keeps a slow sink
(TensorBoard's histograms and text) from holding the history file's lines back. The
monitor waits for the queues (:meth:`BackgroundWriter.flush`) before a stop returns, before
its state is saved and when it closes; the interpreter waits for them at exit, when an
exception ends the program; only a hard kill (``SIGKILL``, ``os._exit``) loses what is still
queued: the history line in flight, normally nothing more, since a line is written within
milliseconds of its check. A call that fails is kept with its error and reported on the
training thread at the next check, flush or close, as a failing sink always was: outputs
never make or change a decision.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["QUEUE_SIZE", "BackgroundWriter"]

log = logging.getLogger(__name__)

#: Sink calls that may wait in the queue before a check waits for the writer.
QUEUE_SIZE = 64
#: Longest wait, in seconds, for the writer to empty its queue (a hung disk must not hang
#: training forever; what is still queued is then reported as not written).
FLUSH_TIMEOUT_S = 120.0

_WRITERS: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class BackgroundWriter:
    """Calls sink hooks off the caller's thread: one daemon thread and queue per sink.

    Example:
        >>> class Printer:
        ...     def log(self, text):
        ...         print(text)
        >>> writer = BackgroundWriter()
        >>> writer.submit(Printer(), "log", ("written off the training thread",))
        >>> writer.flush()
        written off the training thread
        True
        >>> writer.failures()
        []
    """

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        self.maxsize = maxsize
        self._lanes: dict[int, _Lane] = {}
        self._failed: collections.deque[tuple[Any, str, BaseException]] = collections.deque()
        self._lock = threading.Lock()
        #: Call sinks on the caller's thread (set at interpreter exit, when no new thread
        #: may start).
        self.inline = False
        _WRITERS.add(self)

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        # A monitor pickled to other processes (spawned DDP ranks) gets a fresh, empty writer.
        return (BackgroundWriter, (self.maxsize,))

    def submit(self, sink: Any, hook: str, args: Sequence[Any]) -> None:
        """Queue ``sink.<hook>(*args)`` behind that sink's calls; waits only if its queue is full.

        A sink stuck for :data:`FLUSH_TIMEOUT_S` (a hung disk) has the call dropped and
        reported as a failure instead of blocking training for good.
        """
        if self.inline:
            self.flush()
            _call_one(sink, hook, tuple(args), self._failed)
            return
        lane = self._lane(sink)
        if lane.stuck and lane.queue.full():  # already waited once: drop at once
            self._failed.append((sink, hook, TimeoutError(
                f"the background writer is stuck (a write has hung for over "
                f"{FLUSH_TIMEOUT_S:.0f} s)")))
            return
        try:
            lane.queue.put((sink, hook, tuple(args)), timeout=FLUSH_TIMEOUT_S)
            lane.stuck = False
        except queue.Full:
            lane.stuck = True
            self._failed.append((sink, hook, TimeoutError(
                f"the background writer was stuck for {FLUSH_TIMEOUT_S:.0f} s")))

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every queued call has run; ``False`` if ``timeout`` ran out first.

        A call queued while :meth:`close` stopped its sink's thread is made now.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            if lane.queue.unfinished_tasks:
                self._lane(lane.sink)  # its thread, started again if close() stopped it
        return all([lane.wait(deadline) for lane in lanes])

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Flush, then stop the threads (a later :meth:`submit` starts new ones)."""
        if not self.flush(timeout):  # a stuck write: keep its thread (a second would reorder)
            return False
        with self._lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.stop(timeout)
        return True

    def retire(self, sink: Any, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Make ``sink``'s queued calls, then end its thread and forget it (a sink replaced).

        ``False`` (the thread kept) if its calls were not done within ``timeout``.
        """
        with self._lock:
            lane = self._lanes.get(id(sink))
        if lane is None or lane.sink is not sink:
            return True
        if not lane.wait(time.monotonic() + timeout):
            return False
        lane.stop(timeout)
        with self._lock:
            if self._lanes.get(id(sink)) is lane and not lane.queue.unfinished_tasks:
                del self._lanes[id(sink)]
        return True

    def failures(self) -> list[tuple[Any, str, BaseException]]:
        """The calls that raised since the last call, as ``(sink, hook, error)``."""
        out = []
        while self._failed:
            out.append(self._failed.popleft())
        return out

    def _lane(self, sink: Any) -> _Lane:
        """The queue and thread of ``sink`` (a new one, or one lost to a fork, is started)."""
        with self._lock:
            lane = self._lanes.get(id(sink))
            if lane is None or lane.sink is not sink:
                lane = self._lanes[id(sink)] = _Lane(sink, self.maxsize)
            if lane.thread is None or not lane.thread.is_alive():
                # The thread holds the queue and the failure list, not the writer: a writer
                # nobody uses any more can be collected (its threads are then stopped).
                lane.thread = threading.Thread(target=_run, args=(lane.queue, self._failed),
                                               name="fesmia-hooks-writer", daemon=True)
                lane.thread.start()
                # not at exit: the monitor's exit hook still writes through this thread
                weakref.finalize(self, _stop, lane.queue).atexit = False
            return lane


class _Lane:
    """One sink's queue of calls and the thread that makes them."""

    def __init__(self, sink: Any, maxsize: int) -> None:
        self.sink = sink
        self.queue: queue.Queue[tuple[Any, str, Sequence[Any]] | None] = queue.Queue(maxsize)
        self.thread: threading.Thread | None = None
        self.stuck = False

    def wait(self, deadline: float) -> bool:
        """Wait until the queue is done, at most until ``deadline``; whether it is."""
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or self.thread is None or not self.thread.is_alive():
                    return not self.queue.unfinished_tasks
                self.queue.all_tasks_done.wait(min(left, 0.5))
        return True

    def stop(self, timeout: float) -> None:
        """End the thread once it has made every call queued before this one.

        The lane stays: a call queued meanwhile is made by the thread a later ``submit``
        or ``flush`` starts (never by two threads at once: the old one is joined first).
        """
        thread = self.thread
        if thread is not None and thread.is_alive():
            self.queue.put(None)
            thread.join(timeout)


def _run(jobs: queue.Queue[Any], failed: collections.deque[Any]) -> None:
    while True:
        item = jobs.get()
        try:
            if item is None:
                return
            _call_one(*item, failed)
        finally:
            jobs.task_done()


def _call_one(sink: Any, hook: str, args: tuple[Any, ...], failed: collections.deque[Any]) -> None:
    try:
        getattr(sink, hook)(*args)
    except BaseException as exc:  # noqa: BLE001 - reported on the training thread
        failed.append((sink, hook, exc))


def _stop(jobs: queue.Queue[Any]) -> None:
    try:
        jobs.put_nowait(None)
    except queue.Full:  # pragma: no cover - a stuck writer keeps its (daemon) thread
        pass


@atexit.register
def _flush_at_exit() -> None:  # pragma: no cover - runs at interpreter exit
    for writer in list(_WRITERS):
        if not writer.flush(timeout=FLUSH_TIMEOUT_S):
            log.warning("fesmia-hooks: outputs still queued at exit were not written")
