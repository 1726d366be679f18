"""POP3 behaviour over loopback with poplib and raw sockets."""

from __future__ import annotations

import poplib
import smtplib
import socket

import pytest
from support import onReactor, readAll


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
