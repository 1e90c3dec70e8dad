"""The worker thread of asynchronous checks (``PrivacyMonitor(asynchronous=True)``).

A check's attack reads features already on the host and, with the default learner, runs
compiled code that releases the GIL: on this thread it runs beside training, on one core
(:func:`~fesmia_hooks.fused.threads_at_most`), leaving torch's threads to training.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from fesmia_hooks.fused import threads_at_most

__all__ = ["AttackWorker"]

T = TypeVar("T")


class AttackWorker:
    """One lazily started worker thread; a pickled copy is a fresh, idle one.

    Example:
        >>> worker = AttackWorker()
        >>> worker.submit(lambda: 6 * 7).result()
        42
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (AttackWorker, ())

    def close(self) -> None:
        """Wait for the queued attacks and stop the thread (a later submit starts one)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the worker thread (after what is already queued there)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fesmia-hooks-attack")
        return self._pool.submit(_on_one_core, fn)


def _on_one_core(fn: Callable[[], T]) -> T:
    with threads_at_most(1):
        return fn()
