"""Connection limits (in total and per client address) and idle timeouts, per protocol."""

from __future__ import annotations

import socket
import time

import pytest
from support import addUser, readAll, startServer

REFUSALS = {"smtp": b"421 4.7.0 ", "pop3": b"-ERR [SYS/TEMP] ", "imap": b"* BYE [UNAVAILABLE] "}
GREETINGS = {"smtp": b"220 ", "pop3": b"+OK", "imap": b"* OK"}


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closedBy(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after C{timeout})."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"still open after {timeout}s: {data!r}")


@pytest.fixture
def limited(dataDir):
    addUser(dataDir, "alice@example.test")
    srv = startServer(dataDir, server={"max_connections": 3, "max_connections_per_ip": 2})
    yield srv
    srv.stop()


@pytest.mark.parametrize("protocol", ["smtp", "pop3", "imap"])
def test_per_address_and_total_limits(limited, protocol):
    port = limited.ports[protocol]
    first = [connect(port) for _ in range(2)]
    for sock in first:
        assert readAll(sock, b"\r\n").startswith(GREETINGS[protocol])
    assert closedBy(connect(port), 10) == \
        REFUSALS[protocol] + b"Too many connections from your address\r\n"
    other = connect(port, "127.0.0.2")  # another address: still below the total of 3
    assert readAll(other, b"\r\n").startswith(GREETINGS[protocol])
    assert closedBy(connect(port, "127.0.0.3"), 10) == \
        REFUSALS[protocol] + b"Too many connections, try again later\r\n"
    first[0].close()
    # The freed slot is taken back once the server has seen the close.
    deadline = time.monotonic() + 10
    while True:
        sock = connect(port, "127.0.0.3")
        line = readAll(sock, b"\r\n")
        if line.startswith(GREETINGS[protocol]) or time.monotonic() > deadline:
            break
        sock.close()
    assert line.startswith(GREETINGS[protocol]), line


def test_limits_are_shared_by_all_listeners(limited):
    smtp = [connect(limited.smtpPort) for _ in range(2)]
    for sock in smtp:
        readAll(sock, b"\r\n")
    assert closedBy(connect(limited.imapPort), 10).startswith(REFUSALS["imap"])


def test_idle_timeouts(dataDir):
    addUser(dataDir, "alice@example.test")
    srv = startServer(dataDir, smtp={"timeout": 1}, pop3={"timeout": 1},
                      imap={"login_timeout": 1})
    try:
        smtp, pop3, imap = (connect(srv.ports[p]) for p in ("smtp", "pop3", "imap"))
        started = time.monotonic()
        assert closedBy(smtp, 10).split(b"\r\n")[-2].startswith(b"421 4.4.2")
        assert closedBy(pop3, 10).startswith(b"+OK")  # greeting, then closed
        assert closedBy(imap, 10).split(b"\r\n")[-2].startswith(b"* BYE")
        assert time.monotonic() - started < 5
        # Over implicit TLS, a client that never handshakes is dropped just the same.
        for protocol in ("submissions", "pop3s", "imaps"):
            silent = connect(srv.ports[protocol])
            started = time.monotonic()
            try:
                assert closedBy(silent, 10) == b""
            except ConnectionResetError:
                pass  # aborted: the TLS layer still held the greeting
            assert time.monotonic() - started < 5, protocol
            silent.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("protocol", ["submissions", "pop3s", "imaps"])
def test_refused_tls_client_that_never_handshakes_is_dropped(limited, protocol, monkeypatch):
    """Over implicit TLS the refusal waits for a handshake: a client that never makes
    one must not hold a socket forever (the limit counts only accepted connections,
    so each such client would cost a file descriptor past the limit)."""
    from twistmail.protocols import limits

    monkeypatch.setattr(limits, "REFUSE_GRACE", 1.0)
    port = limited.ports[protocol]
    held = [connect(port) for _ in range(2)]  # the per-address limit, counted at accept
    started = time.monotonic()
    refused = connect(port)
    with pytest.raises(ConnectionResetError):  # aborted: no handshake, so not a byte
        closedBy(refused, 10)
    assert time.monotonic() - started < 5
    for sock in held:
        sock.close()
