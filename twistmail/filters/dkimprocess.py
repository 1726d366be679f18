# -*- test-case-name: tests.test_dkimprocess -*-
"""DKIM verification and signing in child processes, beside the reactor on another core.

Canonicalising and hashing a message is Python work that holds the GIL: in
a thread it takes its time from the reactor all the same, about half the
cost of accepting a message.  A child process runs beside it, as Postfix's
smtpd hands a message to opendkim over milter.  The child makes no DNS
queries: the parent sends the key records it already holds with the
message; a child that needs one it was not sent answers L{MISSED} and the
parent verifies the message the ordinary way, in its DNS pool.

A request is a module-level function and its arguments (for verifying:
L{verifyThen}, the message, its key records, and what to make of the
results: the filter's verdict, so that is done beside the reactor too; for
signing, L{twistmail.filters.dkimsign}'s); the answer is what it returns.
Both are pickled, each after its length (4 octets, network order): the
child is our own program, run from our own interpreter, never given
anything a client could choose but the message bytes.  A child that
overruns C{deadline} is killed; a child that dies fails its pending
requests (the parent does their work itself), and another is started in its
place L{RESTART_DELAY} later.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from collections import deque

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from twistmail._writenow import writeThrough
from twistmail.filters import dkimverify
from twistmail.relay.mx import DNSFailure

log = Logger()

#: The child's answer when it needed a key record it was not sent.
MISSED = "missed"
#: A request larger than this is never sent (the filter checks such messages in its pool).
MAX_REQUEST = 1024 * 1024
#: Seconds after a child died (or was killed) before another is started in its place;
#: meanwhile its requests are answered L{MISSED}.  A message that kills its child
#: costs a process start once per this delay at most, not once per message.
RESTART_DELAY = 10.0
#: Seconds a child may take over one request before it is killed (and the server does
#: the work itself); a message of a few kilobytes takes milliseconds.
DEADLINE = 5.0


class _TXT:
    """One TXT record as the verifier reads it (dnspython's C{strings})."""

    def __init__(self, text: bytes) -> None:
        self.strings = (text,)


class _Sent:
    """The child's lookups: the records the parent sent, by name; no DNS at all.

    One it was not sent fails as temporary (whatever the verifier makes of
    that is thrown away) and sets C{missed}."""

    missed = False

    def __init__(self, keys: dict[str, list[bytes]]) -> None:
        self._keys = keys

    def records(self, name: str, rdtype: str) -> list:
        if rdtype != "TXT" or name not in self._keys:
            self.missed = True
            raise DNSFailure(True, "4.4.3", f"{name} {rdtype} not sent")
        return [_TXT(text) for text in self._keys[name]]


def answer(request: bytes) -> bytes:
    """The child's work: a pickled (function, arguments) in, what it returns pickled out."""
    try:
        f, args = pickle.loads(request)
        return pickle.dumps(f(*args))
    except Exception:  # a bug: the parent does the work itself instead
        return pickle.dumps(MISSED)


def verifyThen(raw: bytes, keys: dict[str, list[bytes]], maxSignatures: int, minimumBits: int,
               then: tuple | None):
    """In the child: L{dkimverify.verifyAll} with the key records sent, then C{then}."""
    lookups = _Sent(keys)
    results = dkimverify.verifyAll(raw, lookups, maxSignatures, minimumBits)
    if lookups.missed:
        return MISSED
    return results if then is None else then[0](results, *then[1])


def main() -> None:
    """The child: requests on stdin, answers on stdout, until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while len(prefix := stdin.read(4)) == 4:
        (length,) = struct.unpack("!I", prefix)
        out = answer(stdin.read(length))
        stdout.write(struct.pack("!I", len(out)) + out)
        stdout.flush()


class _Child(ProcessProtocol):
    """The parent's end of one child's stdin/stdout: answers come back in order."""

    def __init__(self, clock) -> None:
        self.pending: deque[defer.Deferred] = deque()
        self.closed = False
        self.ended = 0.0
        self._clock = clock
        self._buffer = b""

    def send(self, data: bytes) -> None:
        """Write C{data} to the child's stdin now, as much as the pipe takes
        (L{writeThrough}): through the transport alone, each request cost a reactor
        turn and two epoll_ctl calls, a tenth of what the server spends on a message."""
        writer = self.transport.pipes[0]
        writeThrough(writer, lambda chunk: os.write(writer.fileno(), chunk), data)

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = struct.unpack("!I", self._buffer[:4])
            if len(self._buffer) < 4 + length:
                return
            answer, self._buffer = self._buffer[4:4 + length], self._buffer[4 + length:]
            if self.pending:
                self.pending.popleft().callback(pickle.loads(answer))

    def errReceived(self, data: bytes) -> None:
        log.error("dkim process pid={pid}: {text}", pid=self.transport.pid,
                  text=data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason) -> None:
        self.closed = True
        self.ended = self._clock.seconds()
        pending, self.pending = self.pending, deque()
        for d in pending:
            d.errback(reason)


class _Slot:
    """One child: running, or not (never started, died, or failed to start)."""

    def __init__(self) -> None:
        self.child: _Child | None = None
        self.down = -RESTART_DELAY  # when its child last died or failed to start

    def resting(self, now: float) -> bool:
        """Its child died or failed to start under L{RESTART_DELAY} ago."""
        if self.child is not None and self.child.closed:
            self.down, self.child = self.child.ended, None
        return self.child is None and now - self.down < RESTART_DELAY


class DKIMProcesses:
    """C{processes} children, each started on first use, given requests in turn."""

    def __init__(self, reactor, processes: int, deadline: float = DEADLINE,
                 argv: tuple[str, ...] = (sys.executable, "-m", __name__)) -> None:
        """@param argv: the child's command line (tests give others)."""
        self._reactor = reactor
        self._argv = list(argv)
        self._slots = [_Slot() for _ in range(processes)]
        self._deadline = deadline
        self._next = 0

    def verify(self, raw: bytes, keys: dict[str, list[bytes]], maxSignatures: int,
               minimumBits: int, then: tuple | None = None) -> defer.Deferred:
        """A Deferred of the DKIMResults of C{raw}, or of L{MISSED} (see L{call}).

        @param then: (a module-level function, its arguments): the child calls it with
            the results and its arguments, and the answer is what it returns.
        """
        return self.call(verifyThen, raw, keys, maxSignatures, minimumBits, then)

    def call(self, f, *args) -> defer.Deferred:
        """A Deferred of C{f(*args)} run in a child, or of L{MISSED} when the request is
        too large, the child is resting (L{RESTART_DELAY}) or C{f} raised; it fails when
        the child cannot start, dies or overruns the deadline.

        @param f: a module-level function (pickled by name).
        """
        request = pickle.dumps((f, args))
        if len(request) > MAX_REQUEST:
            return defer.succeed(MISSED)
        slot = self._slots[self._next % len(self._slots)]
        self._next += 1
        if slot.resting(self._reactor.seconds()):
            return defer.succeed(MISSED)  # the pool's turn for a while
        if slot.child is None:
            try:
                slot.child = self._start()
            except Exception:
                slot.down = self._reactor.seconds()
                log.failure("dkim process did not start")
                return defer.fail()
        return self._send(slot.child, request)

    def _start(self) -> _Child:
        """A new child; spawnProcess forks and runs it before it returns."""
        child = _Child(self._reactor)
        self._reactor.spawnProcess(child, self._argv[0], self._argv, env=os.environ)
        log.info("dkim process started pid={pid}", pid=child.transport.pid)
        return child

    def _send(self, child: _Child, request: bytes) -> defer.Deferred:
        # Written before it is pending: should writing raise, nothing is left pending to
        # fail again.  Its answer cannot come before the next reactor turn.
        child.send(struct.pack("!I", len(request)) + request)
        d = defer.Deferred()
        child.pending.append(d)
        timer = self._reactor.callLater(self._deadline, self._overran, child)
        return d.addBoth(_cancelled, timer)

    def _overran(self, child: _Child) -> None:
        log.warn("dkim process pid={pid} overran {deadline}s: killed",
                 pid=child.transport.pid, deadline=self._deadline)
        try:
            child.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def stop(self) -> None:
        """Close every child's stdin: each ends after its current request."""
        for slot in self._slots:
            if slot.child is not None and not slot.child.closed:
                slot.child.transport.loseConnection()


def _cancelled(result, timer):
    if timer.active():
        timer.cancel()
    return result


if __name__ == "__main__":
    main()
