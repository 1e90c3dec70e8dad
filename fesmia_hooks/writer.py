"""Outputs off the training thread: one background writer per monitor.

Writing a check's outputs (a TensorBoard event, a histogram, a text summary, an fsynced
history line) takes longer than the statistics. A :class:`BackgroundWriter` calls the
monitor's own sinks (the history file and TensorBoard of its ``log_dir``) from one daemon
thread, in the order the monitor asked, through a bounded queue: a check returns as soon as
its outputs are queued, and only a writer more than :data:`QUEUE_SIZE` calls behind makes
training wait. The monitor waits for the queue (:meth:`BackgroundWriter.flush`) before a
stop returns, before its state is saved and when it closes; the interpreter waits for it at
exit, when an exception ends the program; only a hard kill (``SIGKILL``, ``os._exit``)
loses what is still queued, normally nothing, since a check's outputs are written within
milliseconds. A call that fails is kept with its error and reported on the training thread
at the next check, flush or close, as a failing sink always was: outputs never make or
change a decision.
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
    """Calls sink hooks in order on one daemon thread.

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
        self._queue: queue.Queue[tuple[Any, str, Sequence[Any]] | None] = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._failed: collections.deque[tuple[Any, str, BaseException]] = collections.deque()
        self._lock = threading.Lock()
        #: Call sinks on the caller's thread (set at interpreter exit, when no new thread
        #: may start).
        self.inline = False
        self._stuck = False
        _WRITERS.add(self)

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        # A monitor pickled to other processes (spawned DDP ranks) gets a fresh, empty writer.
        return (BackgroundWriter, (self._queue.maxsize,))

    def submit(self, sink: Any, hook: str, args: Sequence[Any]) -> None:
        """Queue ``sink.<hook>(*args)``; waits only while the queue is full.

        A writer stuck for :data:`FLUSH_TIMEOUT_S` (a hung disk) drops the call and reports
        it as a failure instead of blocking training for good.
        """
        if self.inline:
            self.flush()
            _call_one(sink, hook, tuple(args), self._failed)
            return
        self._ensure_thread()
        if self._stuck and self._queue.full():  # already waited once: drop at once
            self._failed.append((sink, hook, TimeoutError(
                f"the background writer is stuck (a write has hung for over "
                f"{FLUSH_TIMEOUT_S:.0f} s)")))
            return
        try:
            self._queue.put((sink, hook, tuple(args)), timeout=FLUSH_TIMEOUT_S)
            self._stuck = False
        except queue.Full:
            self._stuck = True
            self._failed.append((sink, hook, TimeoutError(
                f"the background writer was stuck for {FLUSH_TIMEOUT_S:.0f} s")))

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every queued call has run; ``False`` if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return not self._queue.unfinished_tasks
                self._queue.all_tasks_done.wait(min(left, 0.5))
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Flush, then stop the thread (a later :meth:`submit` starts a new one)."""
        done = self.flush(timeout)
        if not done:  # a stuck write: keep its thread (a second one would reorder the calls)
            return False
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        return True

    def failures(self) -> list[tuple[Any, str, BaseException]]:
        """The calls that raised since the last call, as ``(sink, hook, error)``."""
        out = []
        while self._failed:
            out.append(self._failed.popleft())
        return out

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # new, or lost to a fork
                # The thread holds the queue and the failure list, not the writer: a writer
                # nobody uses any more can be collected (its thread is then stopped).
                self._thread = threading.Thread(target=_run, args=(self._queue, self._failed),
                                                name="fesmia-hooks-writer", daemon=True)
                self._thread.start()
                # not at exit: the monitor's exit hook still writes through this thread
                weakref.finalize(self, _stop, self._queue).atexit = False


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
