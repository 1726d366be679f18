"""Connection limits shared by every listener: in total and per client address.

A refused client gets one protocol-appropriate line and a closed connection
instead of a silent reset, so it can tell "busy" from "down".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.internet import protocol
from twisted.logger import Logger

from twistmail.metrics import Metrics

log = Logger()

#: Seconds a refused client has to take its one line before the socket is aborted.
REFUSE_GRACE = 10.0


class _Refuse(protocol.Protocol):
    """One line, then close; aborted after L{REFUSE_GRACE} if the line is not taken
    (over implicit TLS it waits for a handshake a client may never make)."""

    _abort = None

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        from twisted.internet import reactor

        self.transport.write(self.line)
        self.transport.loseConnection()
        self._abort = reactor.callLater(REFUSE_GRACE, self.transport.abortConnection)

    def connectionLost(self, reason) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()


class ConnectionLimiter:
    def __init__(self, maxTotal: int, maxPerAddress: int, metrics: Metrics | None = None) -> None:
        self.maxTotal = maxTotal
        self.maxPerAddress = maxPerAddress
        metrics = metrics or Metrics()
        self._refusedTotal = metrics.connectionsRefused.labels("total")
        self._refusedPerAddress = metrics.connectionsRefused.labels("per_address")
        self.total = 0
        self.perAddress: Counter = Counter()

    def check(self, addr) -> bytes | None:
        """Why a new connection from C{addr} must be refused, or None."""
        host = getattr(addr, "host", str(addr))
        if self.total >= self.maxTotal:
            log.warn("refused {host}: {total} connections in total", host=host, total=self.total)
            self._refusedTotal.inc()
            return b"Too many connections, try again later"
        if self.perAddress[host] >= self.maxPerAddress:
            log.warn("refused {host}: {n} connections from this address", host=host,
                     n=self.perAddress[host])
            self._refusedPerAddress.inc()
            return b"Too many connections from your address"
        return None

    def refuse(self, line: bytes) -> protocol.Protocol:
        return _Refuse(line)

    def track(self, proto: protocol.Protocol, addr) -> None:
        """Count C{proto} until its connectionLost runs."""
        host = getattr(addr, "host", str(addr))
        self.total += 1
        self.perAddress[host] += 1
        original = proto.connectionLost

        def connectionLost(reason, _original=original) -> None:
            self.total -= 1
            self.perAddress[host] -= 1
            if not self.perAddress[host]:
                del self.perAddress[host]
            _original(reason)

        proto.connectionLost = connectionLost


def admit(limiter: ConnectionLimiter | None, addr, refusal: bytes,
          build: Callable[[], protocol.Protocol]) -> protocol.Protocol:
    """A factory's buildProtocol under C{limiter}: C{build()}, counted; or, past a limit,
    the line C{refusal} + why + CRLF, then close."""
    if limiter is not None:
        why = limiter.check(addr)
        if why:
            return limiter.refuse(refusal + why + b"\r\n")
    p = build()
    if limiter is not None:
        limiter.track(p, addr)
    return p
