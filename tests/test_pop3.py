"""POP3 behaviour over loopback with poplib and raw sockets."""

from __future__ import annotations

import poplib
import smtplib
import socket

import pytest
from support import (
    everyBackend,  # noqa: F401 - the backend fixture: each test on every backend
    externalDelivery,
    onReactor,
    readAll,
)


def send(server, *bodies: bytes, rcpt: str = "alice@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        for body in bodies:
            s.sendmail("x@remote.test", [rcpt], body)


def login(server, user="alice@example.test", password="secret") -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
    p.user(user)
    p.pass_(password)
    return p


def msg(n: int) -> bytes:
    return f"Subject: message {n}\r\n\r\nbody {n}\r\n.leading dot\r\n\r\nend\r\n".encode()


def test_greeting_and_capa(server):
    p = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    assert b"<" not in p.getwelcome()  # no APOP timestamp: APOP cannot work with hashed passwords
    caps = p.capa()
    for cap in ("TOP", "USER", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"):
        assert cap in caps
    p.quit()


def test_retrieve_exact_bytes(server):
    send(server, msg(1), msg(2))
    p = login(server)
    count, size = p.stat()
    assert count == 2
    sizes = [int(line.split()[1]) for line in p.list()[1]]
    assert sum(sizes) == size
    resp, lines, octets = p.retr(1)
    assert resp.startswith(b"+OK")
    data = b"\r\n".join(lines) + b"\r\n"
    assert len(data) == sizes[0] == octets
    assert data.endswith(msg(1))
    assert data.startswith(b"Received: ")
    p.quit()


def test_top(server):
    send(server, b"Subject: t\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n")
    p = login(server)
    _, lines, _ = p.top(1, 2)
    assert lines[-4:] == [b"X: y", b"", b"l1", b"l2"]
    _, lines, _ = p.top(1, 0)
    assert lines[-1] == b""
    _, lines, _ = p.top(1, 99)
    assert lines[-3:] == [b"l1", b"l2", b"l3"]
    p.quit()


def test_uidl_stable_across_sessions_and_deliveries(server):
    send(server, msg(1), msg(2))
    p = login(server)
    first = p.uidl()[1]
    p.quit()
    send(server, msg(3))
    p = login(server)
    second = p.uidl()[1]
    assert second[:2] == first
    assert len(set(second)) == 3
    assert p.uidl(2).split()[-1] == first[1].split()[-1]
    p.quit()


def test_another_programs_delivery_is_there_at_the_next_login(server):
    """procmail writing the Maildir, or appending to the mbox with fcntl and dot-lock."""
    send(server, msg(1))
    p = login(server)
    assert p.stat()[0] == 1
    p.quit()
    externalDelivery(server.dataDir, "alice@example.test", msg(2), server.backend)
    p = login(server)
    assert p.stat()[0] == 2
    assert b"\r\n".join(p.retr(2)[1]) + b"\r\n" == msg(2)
    p.quit()


def test_dele_committed_only_at_quit(server):
    send(server, msg(1), msg(2), msg(3))
    p = login(server)
    p.dele(1)
    with pytest.raises(poplib.error_proto):
        p.retr(1)  # deleted messages are gone for this session
    assert p.stat()[0] == 2
    p.rset()
    assert p.stat()[0] == 3
    p.dele(2)
    p.quit()
    p = login(server)
    assert p.stat()[0] == 2
    assert b"message 1" in b"\r\n".join(p.retr(1)[1])
    assert b"message 3" in b"\r\n".join(p.retr(2)[1])
    p.quit()


def test_dropped_connection_deletes_nothing(server):
    send(server, msg(1), msg(2))
    p = login(server)
    p.dele(1)
    p.dele(2)
    p.sock.shutdown(socket.SHUT_RDWR)  # vanish without QUIT
    p.close()
    # The lock is released when the server notices the close; retry until it has.
    for _ in range(50):
        try:
            p = login(server)
            break
        except poplib.error_proto as e:
            assert b"[IN-USE]" in e.args[0]
    else:
        raise AssertionError("mailbox still locked after the client vanished")
    assert p.stat()[0] == 2
    p.quit()


def test_second_session_refused_in_use(server):
    send(server, msg(1))
    p = login(server)
    with pytest.raises(poplib.error_proto) as e:
        login(server)
    assert e.value.args[0].startswith(b"-ERR [IN-USE]")
    p.quit()
    login(server).quit()  # released at QUIT


def test_login_failures(server):
    p = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
    p.user("alice@example.test")
    with pytest.raises(poplib.error_proto) as e:
        p.pass_("wrong-password")
    assert e.value.args[0].startswith(b"-ERR [AUTH]")
    p.user("nobody@example.test")
    with pytest.raises(poplib.error_proto) as e:
        p.pass_("secret")
    assert e.value.args[0].startswith(b"-ERR [AUTH]")
    p.user("ALICE@Example.Test")  # addresses are case-insensitive
    assert p.pass_("secret").startswith(b"+OK")
    p.quit()


def test_login_logged_without_password(server):
    from twisted.logger import globalLogPublisher

    seen = []
    onReactor(globalLogPublisher.addObserver, seen.append)
    try:
        p = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
        p.user("alice@example.test")
        with pytest.raises(poplib.error_proto):
            p.pass_("hunter2-wrong")
        p.user("alice@example.test")
        p.pass_("secret")
        p.quit()
    finally:
        onReactor(globalLogPublisher.removeObserver, seen.append)
    logins = [e for e in seen if e.get("log_format", "").startswith("pop3 login")]
    assert [e["log_format"].rsplit("=", 1)[1] for e in logins] == ["failed", "ok"]
    assert all(e["user"] == "alice@example.test" and e["client"] == "127.0.0.1" for e in logins)
    assert "hunter2" not in repr(seen) and "secret" not in repr(logins)


def test_hostile_and_malformed_commands(server):
    send(server, msg(1))
    sock = socket.create_connection(("127.0.0.1", server.pop3Port), timeout=10)
    readAll(sock, b"\r\n")
    sock.sendall(b"STAT\r\n")  # before login
    assert readAll(sock, b"\r\n").startswith(b"-ERR")
    sock.sendall(b"USER alice@example.test\r\nPASS secret\r\n")
    assert readAll(sock, b"+OK Authentication succeeded").count(b"+OK") == 2
    for bad in (b"RETR", b"RETR abc", b"RETR 0", b"RETR 99", b"RETR -1", b"DELE 5", b"TOP 1",
                b"TOP 1 x", b"LIST 7", b"UIDL 9", b"\x00\xff", b"", b"FOO bar", b"APOP a b"):
        sock.sendall(bad + b"\r\n")
        assert readAll(sock, b"\r\n").startswith(b"-ERR"), bad
    sock.sendall(b"DELE 1\r\nDELE 1\r\n")  # deleting twice
    replies = readAll(sock, b"-ERR")
    assert replies.startswith(b"+OK")
    sock.sendall(b"NOOP\r\n")
    assert readAll(sock, b"\r\n").startswith(b"+OK")
    sock.sendall(b"X" * 5000 + b"\r\n")  # over the line limit: -ERR and disconnect
    assert readAll(sock, b"\r\n").startswith(b"-ERR")
    sock.close()


def test_pipelined_retrs_answered_in_order(server):
    send(server, *(msg(n) for n in range(1, 6)))
    sock = socket.create_connection(("127.0.0.1", server.pop3Port), timeout=10)
    readAll(sock, b"\r\n")
    sock.sendall(b"USER alice@example.test\r\nPASS secret\r\n" +
                 b"".join(b"RETR %d\r\n" % n for n in range(1, 6)) + b"QUIT\r\n")
    data = readAll(sock, b"+OK Bye")
    positions = [data.index(f"message {n}".encode()) for n in range(1, 6)]
    assert positions == sorted(positions)
    sock.close()


def reference(message: bytes, topLines: int | None = None) -> bytes:
    """What a RETR / TOP response body must be, computed the simple way from the whole message."""
    lines = message.split(b"\n")
    if topLines is not None:
        # The header, the blank line, then topLines lines of the body (everything if shorter).
        ends = [i for i, line in enumerate(lines) if line in (b"", b"\r")]
        if ends:
            blank = ends[0]
            bodyLines = len(lines) - blank - 1 - message.endswith(b"\n")
            if topLines < bodyLines:
                lines = lines[:blank + 1 + topLines] + [b""]
    stuffed = b"\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


BODY_CASES = [
    b"",
    b".",
    b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
    b"Subject: x\r\n\r\nno final newline",
    b"Subject: bare LF\n\n.dot after bare LF\nline\r.not a line start\n",
    b"Subject: x\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n",
    b"no header end at all\r\n.dot\r\n",
    b"Subject: x\r\n\r\n",
]


@pytest.mark.parametrize("message", BODY_CASES)
@pytest.mark.parametrize("topLines", [None, 0, 1, 2, 10])
def test_response_body_is_the_same_however_the_message_is_split(message, topLines):
    """Streaming feeds the message in chunks: stuffing and TOP must not depend on where they split."""
    from twistmail.protocols.pop3 import _Body

    expected = reference(message, topLines)
    for split in range(len(message) + 1):
        body = _Body(topLines)
        out = body.feed(message[:split]) + body.feed(message[split:]) + body.end()
        assert out == expected, (split, out)
    body = _Body(topLines)
    out = b"".join(body.feed(message[i:i + 1]) for i in range(len(message))) + body.end()
    assert out == expected


def test_big_message_streams_byte_exact(server):
    """Over the read-in-one-go size a message is streamed in chunks, dots stuffed across them."""
    from twistmail.protocols import pop3 as ours

    line = b".dot at a chunk boundary? " + b"x" * 70 + b"\r\n"
    body = line * ((ours.WHOLE_MESSAGE + 3 * ours.CHUNK) // len(line))
    message = b"Subject: big\r\n\r\n" + body
    send(server, message, msg(2))
    p = login(server)
    _, lines, octets = p.retr(1)
    data = b"\r\n".join(lines) + b"\r\n"
    assert len(data) == octets > ours.WHOLE_MESSAGE
    assert data.endswith(message)
    _, top, _ = p.top(1, 3)
    assert top[-5:] == [b"Subject: big", b"", *[line[:-2]] * 3]
    _, lines, _ = p.retr(2)
    assert (b"\r\n".join(lines) + b"\r\n").endswith(msg(2))
    p.quit()


def test_retrieval_in_any_order_after_read_ahead(server):
    """RETR answers from read-ahead must be the right message, and never a deleted one."""
    send(server, *(msg(n) for n in range(1, 9)))
    p = login(server)
    for n in (1, 5, 2, 8, 3):
        _, lines, _ = p.retr(n)
        assert (b"\r\n".join(lines) + b"\r\n").endswith(msg(n)), n
    p.dele(4)
    with pytest.raises(poplib.error_proto):
        p.retr(4)
    p.rset()
    _, lines, _ = p.retr(4)
    assert (b"\r\n".join(lines) + b"\r\n").endswith(msg(4))
    p.quit()
