# -*- test-case-name: tests.test_relay_fairness -*-
"""Fair turns for the relay queue: one sender's flood waits behind itself, not others.

Every queued message belongs to a *lane*, named by :func:`laneKey`: its
sender's address, or for a bounce (null sender ``<>``) its recipient, so
thousands of bounces to one address (backscatter) are one lane too.  Where
messages wait for their turn — to be worked on at all, for a delivery slot,
for a connection to their domain — they are served one message per lane per
round (:class:`FairQueue`), oldest first within a lane, instead of first
come, first served.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer

#: RFC 5321 §4.5.3.1: 64 octets of local part, 255 of domain.
_MAX_KEY = 320


def laneKey(sender: str, recipients: Sequence[str]) -> str:
    """The lane of a message from C{sender} to C{recipients}.

    The sender's address, case-folded, without a ``+tag`` (RFC 5233
    subaddress: the same account); for ``<>`` the first recipient, so
    backscatter to one address is one lane.  Interned: the messages of one
    lane share one string.
    """
    address = (sender or (recipients[0] if recipients else "")).lower()
    local, at, domain = address.rpartition("@")
    if at:
        address = f"{local.split('+', 1)[0]}@{domain}"
    return sys.intern(address[:_MAX_KEY])


class FairQueue:
    """Items of many lanes, taken in turn: one per lane per round, FIFO within a lane.

    Start-time fair queueing with unit cost: items are served in the order
    of their tags; an item's tag is one more than its lane's newest, so a
    backlog cannot bank turns, and an item of a lane with nothing waiting is
    tagged half a turn after the item last served, so it goes before the
    next turn of the lanes with a backlog (FQ-CoDel serves new flows first
    the same way).  Costs one heap entry per item and one dict entry per lane
    with items.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Any]] = []
        self._last: dict[str, float] = {}  # lane -> tag of its newest item
        self._served = 0.0
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, lane: str, item: Any) -> None:
        last = self._last.get(lane)
        tag = self._served + 0.5 if last is None else last + 1
        self._last[lane] = tag
        heapq.heappush(self._heap, (tag, next(self._order), lane, item))

    def pop(self) -> Any:
        """The next item in turn (IndexError when empty)."""
        tag, _, lane, item = heapq.heappop(self._heap)
        self._served = tag
        if self._last.get(lane) == tag:
            del self._last[lane]  # that was the lane's newest: it is empty now
        return item


class FairSemaphore:
    """A DeferredSemaphore whose waiters get the freed tokens in lane turns, not FIFO."""

    def __init__(self, limit: int) -> None:
        self.limit = self.tokens = limit
        self._waiting = FairQueue()

    def acquire(self, lane: str) -> defer.Deferred:
        if self.tokens:
            self.tokens -= 1
            return defer.succeed(self)
        d = defer.Deferred()
        self._waiting.push(lane, d)
        return d

    def release(self) -> None:
        if self._waiting:
            self._waiting.pop().callback(self)  # the token passes straight on
        else:
            self.tokens += 1

    @property
    def idle(self) -> bool:
        """No token taken and no one waiting."""
        return self.tokens == self.limit
