# -*- test-case-name: tests.test_batchcalls -*-
"""Many small blocking calls in a few worker-thread calls: ``BatchedCalls``.

The relay reads a queue entry for every message it delivers.  One worker
thread call per message costs the reactor thread a dispatch and a wake-up
each (``deferToThread``: a Deferred, a lock, the waker), which under a
draining queue is as much as the read itself.  Here calls that arrive while
``parallel`` batches are already running wait and go together in the next
one, as ``twistmail._groupcommit`` does for syncs: at low load every call
runs at once on its own, under load they share thread calls.  Several
batches run at once because a worker thread waits for the GIL after each
system call while the reactor thread is busy; threads waiting together hand
it on to each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


def _callEach(f: Callable, items: list) -> list:
    """In a worker thread: C{f(item)} for each item; an exception is its item's result."""
    results = []
    for item in items:
        try:
            results.append((True, f(item)))
        except Exception as e:  # that item's failure; the others go on
            results.append((False, e))
    return results


class BatchedCalls:
    """C{calls(item)}: a Deferred of C{f(item)}, run off the reactor thread in batches.

    All state lives on the reactor thread.
    """

    def __init__(self, run: Callable, f: Callable[[Any], Any], parallel: int = 4,
                 size: int = 32) -> None:
        """@param run: C{run(g, *args) -> Deferred}, running g in a worker thread.
        @param parallel: batches running at once, at most.
        @param size: items per batch, at most."""
        self._run = run
        self._f = f
        self._parallel = parallel
        self._size = size
        self._pending: list[tuple[Any, defer.Deferred]] = []
        self._running = 0

    def __call__(self, item: Any) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append((item, d))
        if self._running < self._parallel:
            self._next()
        return d

    def _next(self) -> None:
        batch = self._pending[:self._size]
        del self._pending[:self._size]
        self._running += 1
        self._run(_callEach, self._f, [item for item, _ in batch]).addBoth(self._done, batch)

    def _done(self, results, batch: list) -> None:
        self._running -= 1
        if isinstance(results, Failure):  # the batch itself failed: so did each call
            results = [(False, results)] * len(batch)
        for (_, d), (ok, value) in zip(batch, results, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        while self._pending and self._running < self._parallel:
            self._next()
