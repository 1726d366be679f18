# -*- test-case-name: tests.test_hostile_flow -*-
"""Backpressure, both ways, and closing, for a connection whose client may not read.

Twisted buffers whatever a protocol writes, without limit, and reads
whatever the client sends.  A client that pipelines commands and never reads
the answers (``EHLO`` 100,000 times: 17 MB of replies for 800 KB sent;
``RETR 1`` 10,000 times: 10,000 copies of a message) or that keeps sending
while a command is outstanding (during an AUTH delay, an APPEND, a RETR)
made the server buffer it all.  And a connection closed with unread output
never closes: ``loseConnection`` waits for the client to read it, forever,
holding a slot of the connection limits.

L{Flow} is registered with the transport as a streaming producer for the
life of the connection, so the transport tells it when its write buffer is
full (``pauseProducing``) and when it has drained; if it does not drain
within the idle timeout, the connection is aborted.  Meanwhile the protocol
starts no new command; the transport stops reading when too much input
waits (L{Flow.backlog}), for that or for an outstanding command.  TCP then
holds the client back.  L{Flow.close} unregisters first (a TLS
transport does not close while a producer is registered) and aborts the
connection if the client has not taken what is left within a grace period.

And a deadline per record (Postfix's ``smtpd_per_record_deadline``): every
byte resets the idle timer, so a client sending one byte every few seconds
and never ending its line held its connection forever.  L{Flow.received}
sees all input: a line (a command, a DATA line, a line of an IMAP literal)
must end within the idle timeout of its first octet, and a longer run
without a line end must move L{RECORD} octets in that time, so a large
upload on a slow link is not cut off while a dribbler is.  The clock stops
while we do not read (the client could not finish its line).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

#: Unprocessed input (octets) at which reading pauses (POP3 uses a smaller limit of its own).
MAX_BACKLOG = 256 * 1024
#: Octets without a line end that count as one record for the deadline (a minimum
#: rate of 8 KiB per timeout inside a long line or literal; Postfix's record is a
#: line of at most line_length_limit = 2048 octets).
RECORD = 8 * 1024


@implementer(IPushProducer)
class Flow:
    """The write side's state as the transport reports it, and the read side's switch."""

    def __init__(self, transport, stallTimeout: Callable[[], float],
                 drained: Callable[[], None] = lambda: None,
                 activity: Callable[[], None] = lambda: None, clock=None,
                 expired: Callable[[], None] = lambda: None, name: str = "") -> None:
        """@param stallTimeout: seconds a client may leave our output unread (the
            protocol's idle timeout) before the connection is aborted, and may take
            over one record of input before C{expired} is called.
        @param drained: called when the client has read everything written.
        @param activity: called then too (the client is reading: not idle).
        @param clock: has C{callLater}; the protocol itself (TimeoutMixin), so that
            a test's Clock runs every timer of the connection.
        @param expired: a record was not completed in time: say so and close
            (the protocol's C{timeoutConnection}).
        @param name: the protocol, for the log."""
        if clock is None:
            from twisted.internet import reactor as clock
        self.transport = transport
        self._stallTimeout = stallTimeout
        self._stall = None
        self.outputFull = False
        self.backlogged = False
        self.stopped = False
        self._reading = True
        self._onDrained = drained
        self._activity = activity
        self._waiters: list[defer.Deferred] = []
        self._clock = clock
        self._abort = None
        self._expired = expired
        self._name = name
        self._deadline = None
        self._pending = 0  # octets received since the last record ended
        transport.registerProducer(self, True)
        self._registered = True

    # -- IPushProducer: the transport about our writes -----------------------------

    def pauseProducing(self) -> None:
        self.outputFull = True
        self._update()
        if self._stall is None and not self.stopped:
            # Not a byte taken for a whole idle timeout: the client is gone or hostile,
            # whatever the protocol is doing (a RETR stops the idle timer, say).
            self._stall = self._clock.callLater(self._stallTimeout(), self._abortNow)

    def resumeProducing(self) -> None:
        self.outputFull = False
        self._cancel("_stall")
        self._update()
        self._activity()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
        if not self.outputFull:
            self._onDrained()

    def stopProducing(self) -> None:
        """The connection is gone (the transport forgets its producer)."""
        self.lost()

    def lost(self) -> None:
        """The protocol's connectionLost: after L{close}, the transport no longer knows us."""
        if self.stopped:
            return
        self.stopped = True
        self._registered = False
        self._cancel("_abort")
        self._cancel("_stall")
        self._cancel("_deadline")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(ConnectionDone())

    # -- for the protocol ---------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Input arrived (every octet, before the protocol frames it): a record ends at
        each line end and every L{RECORD} octets without one; the deadline runs
        from the first octet of a record to its end."""
        end = data.rfind(b"\n")
        pending = len(data) - end - 1 if end >= 0 else self._pending + len(data)
        if end >= 0 or pending >= RECORD:
            self._cancel("_deadline")
        self._pending = pending % RECORD
        self._armDeadline()

    def _armDeadline(self) -> None:
        if self._pending and self._deadline is None and self._reading and self._registered:
            self._deadline = self._clock.callLater(self._stallTimeout(), self._deadlinePassed)

    def _deadlinePassed(self) -> None:
        self._deadline = None
        if not self.stopped:
            log.info("{name} client={client} disconnected: a line not completed within "
                     "{timeout}s", name=self._name,
                     client=getattr(self.transport.getPeer(), "host", "unknown"),
                     timeout=self._stallTimeout())
            self._expired()

    def drained(self) -> defer.Deferred:
        """Fires when the client has read what was written (at once if it has);
        fails with ConnectionDone if the connection is lost first."""
        if self.stopped:
            return defer.fail(ConnectionDone())
        if not self.outputFull:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def backlog(self, full: bool) -> None:
        """Too much input waits for the command in progress: stop reading until not."""
        if full != self.backlogged:
            self.backlogged = full
            self._update()

    def _update(self) -> None:
        # Only the backlog stops reading: the protocol starts no command while the
        # output is full, so what the client sends piles up to MAX_BACKLOG and then
        # stops.  (Stopping at once would deadlock a TLS handshake: the TLS layer
        # reports "full" while it holds our greeting until the handshake is done.)
        reading = not self.backlogged
        if reading != self._reading and not self.stopped:
            self._reading = reading
            if reading:
                self.transport.resumeProducing()
                self._armDeadline()  # afresh: the client could not send meanwhile
            else:
                self.transport.pauseProducing()
                self._cancel("_deadline")

    def startTLS(self, contextFactory) -> None:
        """Switch the transport to TLS, keeping what it knows of us.

        Twisted moves a registered producer to the new TLS layer itself, behind a
        fresh stand-in that believes we are not paused.  If we are (our last reply
        filled the buffer), the transport's "drained" would stop at that stand-in
        and we would wait forever: tell it, so the resume reaches us."""
        full = self.outputFull
        self._pending = 0  # what came in plaintext is dropped; the handshake is not ours
        self._cancel("_deadline")
        self.transport.startTLS(contextFactory)
        membrane = getattr(getattr(self.transport, "protocol", None), "_producer", None)
        if full and self._registered and membrane is not None:
            membrane.pauseProducing()

    def close(self, grace: float | None, abort: bool = False) -> None:
        """Close the connection once what was written has been read; abort it if that
        has not happened within C{grace} seconds (None: wait as long as it takes), or
        at once with C{abort} (a client idle for a whole timeout and not reading)."""
        self._cancel("_deadline")  # closing: the grace period bounds what is left
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        if grace is not None and self._abort is None and not self.stopped:
            self._abort = self._clock.callLater(grace, self._abortNow)

    def _abortNow(self) -> None:
        self._abort = self._stall = None
        if not self.stopped:
            self.transport.abortConnection()

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        setattr(self, name, None)
        if call is not None and call.active():
            call.cancel()
