"""Cross-protocol requests on the SMTP listeners: an HTTP request is not an SMTP session.

A web page can make a browser POST a form to port 25: the request line and the
headers draw "500 unknown command", and the form's body, holding HELO / MAIL /
RCPT / DATA, was then read as an SMTP session and its message delivered.  As
Postfix (``smtpd_forbidden_commands = CONNECT GET POST`` and its check for
header-shaped commands), the first such line ends the session: one ``221`` and
the connection closes; nothing pipelined behind it is read.
"""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest
from hostile import errors, logged  # noqa: F401 - logged is a fixture
from support import storedMessages

ALICE = "alice@example.test"

#: What a browser sends for a form posted to http://mx.example.test:25/ (its body as
#: text/plain, which the browser sends as it is: one "name=value" line per field).
SMTP_IN_BODY = (b"HELO evil.example\r\nMAIL FROM:<spam@evil.example>\r\n"
                b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: cross-protocol\r\n\r\n"
                b"delivered by a web page\r\n.\r\nQUIT\r\n")
BROWSER_POST = (b"POST / HTTP/1.1\r\n"
                b"Host: mx.example.test:25\r\n"
                b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
                b"Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\n"
                b"Content-Type: text/plain\r\n"
                b"Content-Length: %d\r\n"
                b"Origin: http://evil.example\r\n"
                b"Connection: keep-alive\r\n"
                b"\r\n" % (len(b"x=\r\n") + len(SMTP_IN_BODY))) + b"x=\r\n" + SMTP_IN_BODY


def _insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _exchange(server, listener: str, data: bytes) -> bytes:
    """Send C{data} at once after the greeting; everything the server sends until it closes."""
    sock = socket.create_connection(("127.0.0.1", server.ports[listener]), timeout=10)
    if listener == "submissions":
        sock = _insecure().wrap_socket(sock, server_hostname="mx.example.test")
    with sock:
        received = b""
        while not received.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            assert chunk, f"closed before the greeting: {received!r}"
            received += chunk
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            received += chunk
    return received


def _replies(received: bytes) -> list[bytes]:
    return [line[:3] for line in received.split(b"\r\n") if line[3:4] == b" "]


def test_browser_post_to_the_mx_port_delivers_nothing(server, logged):  # noqa: F811
    """The embedded message was delivered to alice.  Now the request line ends the
    session: the greeting and one 221, no reply to the headers or the body."""
    received = _exchange(server, "smtp", BROWSER_POST)
    assert _replies(received) == [b"220", b"221"], received
    assert b"221 2.7.0 " in received
    assert storedMessages(server.dataDir, ALICE, server.backend) == []
    events = [e for e in logged if "not an SMTP command" in str(e.get("log_format", ""))]
    assert len(events) == 1 and events[0]["client"] == "127.0.0.1", events
    assert events[0]["line"] == "POST\\x20/\\x20HTTP/1.1"  # escaped like all client text
    assert errors(logged) == []


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"POST /form HTTP/1.0", b"CONNECT mx:25 HTTP/1.1",
                                  b"PUT / HTTP/1.1", b"HEAD / HTTP/1.1", b"OPTIONS * HTTP/1.1",
                                  b"DELETE / HTTP/1.1", b"PATCH / HTTP/1.1", b"TRACE / HTTP/1.1",
                                  b"get /", b"Host: mx.example.test", b"User-Agent: curl/8.0",
                                  b"X-Anything:value", b"content-length: 0"])
def test_http_lines_close_the_session_at_once(server, logged, line):  # noqa: F811
    """What was pipelined behind the line is never answered."""
    received = _exchange(server, "smtp", b"EHLO client.example\r\n" + line + b"\r\nNOOP\r\nRSET\r\n")
    assert _replies(received) == [b"220", b"250", b"221"], received
    assert errors(logged) == []


@pytest.mark.parametrize("listener", ["smtp", "submission", "submissions"])
@pytest.mark.parametrize("before", [[], [b"EHLO client.example"],
                                    [b"EHLO client.example", b"MAIL FROM:<x@remote.test>"]])
def test_every_smtp_listener_at_any_point_of_the_session(server, logged, listener,  # noqa: F811
                                                         before):
    """MX, submission and submissions; before EHLO, after it, inside a transaction."""
    commands = [*before, b"User-Agent: x", b"NOOP", b"RSET"]
    received = _exchange(server, listener, b"".join(c + b"\r\n" for c in commands))
    expected = [b"220"] + [b"530" if listener != "smtp" and c.startswith(b"MAIL") else b"250"
                           for c in before] + [b"221"]
    assert _replies(received) == expected, received
    assert errors(logged) == []


def test_http_text_inside_data_is_just_message_text(server):
    """Inside DATA nothing is a command: a message may quote an HTTP request."""
    body = (b"Subject: quoting\r\n\r\nGET / HTTP/1.1\r\nHost: example.test\r\n"
            b"POST /x HTTP/1.1\r\n")
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=10) as client:
        client.sendmail("x@remote.test", [ALICE], body)
        assert client.noop()[0] == 250
    [stored] = storedMessages(server.dataDir, ALICE, server.backend)
    assert stored.endswith(body)


def test_smtp_verbs_and_addresses_with_colons_are_not_headers(server):
    """A legitimate session (MAIL FROM:, RCPT TO:, a colon in an argument) is unaffected."""
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=10) as client:
        client.ehlo("client.example")
        assert client.docmd("MAIL", "FROM:<x@remote.test>")[0] == 250
        assert client.docmd("RCPT", "TO:<alice@example.test>")[0] == 250
        assert client.docmd("VRFY", "alice:x")[0] == 252
        assert client.docmd("NOOP", "Host: x")[0] == 250
        assert client.rset()[0] == 250
