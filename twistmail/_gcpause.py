"""Pause the cyclic garbage collector while building many objects at once.

Loading a 100,000-message folder index makes some 100,000 lists and strings,
none of them in a reference cycle; every 700 allocations CPython runs a
generation-0 collection and every tenth of those a generation-1 one that
walks the young objects again: about a third of the load time.  Inside
L{paused} the collector is off (for every thread: it is process-wide).  At
the end everything is moved to the oldest generation (C{gc.freeze} then
C{gc.unfreeze}), so the next young collection does not walk the 100,000 new
objects either; only a full collection will, as it would anyway.  (Only
freezing would be cheaper still, but a reference cycle that became garbage
meanwhile in another thread would then never be collected.)  Nested and
concurrent uses are counted: the collector comes back on when the last one
ends, if it was on before the first began.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

#: Fewer objects than this are not worth a pause (see L{paused}).
BULK = 10000

#: The youngest generation's threshold while the server runs (L{raiseForServer};
#: CPython's default is 700).  A relayed message's objects (Deferreds, generators,
#: its entry) live for its ~0.1 s round trips; at 700 a young collection came every
#: few milliseconds under a draining queue, so each of them was walked young, then
#: again in the middle generation, then by full collections of every object in the
#: process (~45 ms each, every connection waiting): bench/relay_drain.py measured
#: 0.32-0.34 s of collections for 6,000 messages, ~50 µs a message on the reactor
#: thread.  At 10,000 most of them are freed by their reference counts first: 10-20
#: collections, 16-17 ms.  Cycles that became garbage wait at most 10,000
#: allocations longer (kilobytes).
SERVER_YOUNG = 10000
_lock = threading.Lock()
_depth = 0
_wasEnabled = False


@contextlib.contextmanager
def paused(objects: int = BULK) -> Iterator[None]:
    """Collector off while about C{objects} objects are made; a no-op below L{BULK}:
    each pause moves every young object to the oldest generation, and doing that
    for every small request would leave garbage cycles to the rare full collections."""
    if objects < BULK:
        yield
        return
    global _depth, _wasEnabled
    with _lock:
        if _depth == 0:
            _wasEnabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _wasEnabled:
                gc.freeze()
                gc.unfreeze()
                gc.enable()


def raiseForServer() -> tuple[int, ...]:
    """The youngest generation's threshold raised to L{SERVER_YOUNG} (never lowered);
    returns the thresholds before, for C{gc.set_threshold(*before)}."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], SERVER_YOUNG), *before[1:])
    return before
