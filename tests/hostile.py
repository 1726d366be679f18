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
