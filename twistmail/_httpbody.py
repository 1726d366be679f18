# -*- test-case-name: tests.test_stspolicy,tests.test_rspamd -*-
"""An HTTP response body read into memory up to a limit (MTA-STS policies, Rspamd answers)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss


class LimitedBody(Protocol):
    """Collects a response body of at most C{limit} octets; past it, hangs up.

    C{done} fires with the body, or fails with C{error(text)}: the body was
    larger than the limit or the connection was lost.  Cancelling C{done}
    hangs up too.
    """

    def __init__(self, limit: int, error: Callable[[str], Exception], what: str = "body") -> None:
        self.done = defer.Deferred(lambda _: self.transport.stopProducing())
        self._limit = limit
        self._error = error
        self._what = what
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:  # never hold more than the limit
            self._parts = []
            self.transport.stopProducing()
            self.done.errback(self._error(f"{self._what} larger than {self._limit} bytes"))
            return
        self._parts.append(data)

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(self._error(f"connection lost: {reason.getErrorMessage()}"))
