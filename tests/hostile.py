"""Helpers for the hostile-client tests (tests/test_hostile_*.py).

What every such test checks besides the answer itself: the server never logs
a traceback for what a client sent (an unhandled exception drops the
connection or leaves it hanging), and the session goes on afterwards.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
from support import onReactor


@pytest.fixture
def logged():
    """Every log event emitted while the test runs (on the reactor thread)."""
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []
    onReactor(globalLogPublisher.addObserver, seen.append)
    yield seen
    onReactor(globalLogPublisher.removeObserver, seen.append)


def errors(seen: list[dict]) -> list[str]:
    """The failures and errors among C{seen}, as text: a hostile client must cause none."""
    from twisted.logger import formatEvent

    return [formatEvent(e) + "\n" + (e["log_failure"].getTraceback() if e.get("log_failure") else "")
            for e in seen if e.get("log_failure") is not None or e.get("isError")]


_SMTP_LAST = re.compile(rb"(?:^|\r\n)\d{3} [^\r\n]*\r\n$")


def smtpReply(sock: socket.socket, timeout: float = 10) -> bytes:
    """One complete (possibly multi-line) SMTP reply."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while not _SMTP_LAST.search(data):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for a reply; got {data!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; got {data!r}")
        data += chunk
    return data


def smtpDialog(port: int, lines: list[bytes], timeout: float = 10) -> list[bytes]:
    """Send each line and collect its reply; the last reply is to a NOOP (the session survived)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        smtpReply(sock, timeout)
        replies = []
        for line in [*lines, b"NOOP"]:
            sock.sendall(line + b"\r\n")
            replies.append(smtpReply(sock, timeout))
        assert replies[-1].startswith(b"250 "), replies
        return replies[:-1]
    finally:
        sock.close()


# -- looking at the server side of a connection (in-process server) -----------------


def serverSide(sock: socket.socket, kind: type):
    """The C{kind} protocol instance serving C{sock} (found on the reactor thread)."""
    import gc

    port = sock.getsockname()[1]

    def find():
        for o in gc.get_objects():
            if isinstance(o, kind) and getattr(o, "transport", None) is not None \
                    and getattr(o.transport.getPeer(), "port", None) == port:
                return o
        return None

    proto = onReactor(find)
    assert proto is not None, "no server-side protocol for this socket"
    return proto


def reading(proto) -> bool:
    """Is the server reading what this client sends (or has it paused)?"""
    from twisted.internet import reactor

    return onReactor(lambda: proto.transport in reactor.getReaders())


def bufferedOutput(proto) -> int:
    """Octets written by the server and not yet taken by the kernel.  Twisted's
    private buffer attributes: this is what grows when a client does not read."""
    t = proto.transport
    return onReactor(lambda: t._tempDataLen + len(t.dataBuffer) - t.offset)


def flood(sock: socket.socket, chunk: bytes, until, limit: int,
          timeout: float = 30) -> tuple[int, bytes]:
    """Send C{chunk} again and again, without reading, until C{until()} is true or
    C{limit} octets have gone (then fail).  Returns the octets sent, and the rest of
    the chunk being sent (to complete the last command)."""
    import select

    sock.setblocking(False)
    sent = 0
    pending = chunk
    deadline = time.monotonic() + timeout
    try:
        while not until():
            if sent >= limit or time.monotonic() > deadline:
                raise AssertionError(f"the server kept reading: {sent} octets sent")
            select.select([], [sock], [], 0.1)
            try:
                n = sock.send(pending)
            except BlockingIOError:
                continue
            sent += n
            pending = pending[n:] or chunk  # whole commands only
        return sent, b"" if pending is chunk else pending
    finally:
        sock.setblocking(True)


def drainCounting(sock: socket.socket, marker: bytes, end: bytes, timeout: float = 60) -> int:
    """Read until C{end}, without keeping it all: how many times C{marker} came."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    count, tail = 0, b""
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {end!r}; {count} {marker!r} so far")
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed before {end!r}; {count} {marker!r} so far")
        data = tail + chunk
        count += data.count(marker) - tail.count(marker)
        if end in data:
            return count
        tail = data[-max(len(marker), len(end)):]
