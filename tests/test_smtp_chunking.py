"""CHUNKING and BINARYMIME (RFC 3030): BDAT over loopback, raw sockets and smtplib."""

from __future__ import annotations

import smtplib

import pytest
from support import addUser, maildirFiles, readAll, startServer
from test_smtp import body, connect, stored

MSG = b"From: x@remote.test\r\nTo: alice@example.test\r\nSubject: chunks\r\n\r\n"
BINARY = bytes(range(256)) + b"\r\n.\r\n.\r\nQUIT\r\n" + b"\x00" * 10 + b"\r\n"


def transaction(sock, extra: bytes = b"") -> bytes:
    sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.test>" + extra + b"\r\n"
                 b"RCPT TO:<alice@example.test>\r\n")
    return readAll(sock, b"250 2.1.5")


def test_ehlo_offers_chunking_binarymime_and_dsn(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.ehlo("c")
        for ext in ("chunking", "binarymime", "dsn"):
            assert s.has_extn(ext), ext


def test_pipelined_bdat_chunks_store_the_exact_octets(server):
    # Binary octets, a lone dot line and "QUIT" inside a chunk are data, not SMTP.
    sock = connect(server)
    transaction(sock, b" BODY=BINARYMIME")
    first, second = MSG + BINARY[:100], BINARY[100:]
    sock.sendall(b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(second) + second
                 + b"NOOP\r\n")
    replies = readAll(sock, b"250 2.0.0 Ok\r\n")
    lines = replies.split(b"\r\n")
    assert lines[0].startswith(b"250 2.0.0 ") and b"octets" in lines[0]
    assert lines[1].startswith(b"250 2.0.0 Ok: queued as ")
    sock.close()
    [copy] = stored(server)
    assert body(copy) == first + second


def test_bdat_zero_last_ends_the_message(server):
    sock = connect(server)
    transaction(sock)
    sock.sendall(b"BDAT %d\r\n" % len(MSG) + MSG + b"BDAT 0 LAST\r\n")
    assert b"queued as" in readAll(sock, b"queued as")
    sock.close()
    assert body(stored(server)[0]) == MSG


@pytest.fixture
def small(dataDir):
    """A server whose message size limit is 10,000 octets."""
    addUser(dataDir, "alice@example.test")
    srv = startServer(dataDir, smtp={"max_message_size": 10_000})
    yield srv
    srv.stop()


def test_huge_chunk_is_refused_before_it_is_read_and_the_session_stays_in_sync(small, dataDir):
    sock = connect(small)
    transaction(sock)
    sock.sendall(b"BDAT 50000 LAST\r\n")
    # Refused at once, before one octet of the chunk was sent.
    assert readAll(sock, b"\r\n").startswith(b"552 5.3.4")
    sock.sendall(b"NOOP\r\n" * 5000 + b"x" * 20000)  # 50,000 octets of chunk, discarded
    sock.sendall(b"NOOP\r\n")
    reply = readAll(sock, b"250 ")
    assert reply.startswith(b"250 2.0.0"), reply  # one reply: the NOOP after the chunk
    sock.sendall(b"BDAT 5 LAST\r\nhello")  # the failed transaction is over
    assert readAll(sock, b"\r\n").startswith(b"503 5.5.1")
    sock.close()
    assert stored(small) == []
    assert maildirFiles(dataDir, "alice@example.test", "tmp") == []


def test_chunks_adding_up_past_the_limit_are_refused(small):
    sock = connect(small)
    transaction(sock)
    chunk = b"x" * 998 + b"\r\n"
    for _ in range(9):
        sock.sendall(b"BDAT 1000\r\n" + chunk)
    sock.sendall(b"BDAT 1000 LAST\r\n" + chunk)
    replies = readAll(sock, b"552 ")
    assert replies.count(b"250 ") == 9 and b"552 5.3.4" in replies
    sock.close()
    assert stored(small) == []


def test_bdat_without_mail_or_rcpt_is_503_and_its_octets_are_skipped(server):
    sock = connect(server)
    sock.sendall(b"EHLO c\r\n")
    readAll(sock, b"250 ")
    sock.sendall(b"BDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
    replies = readAll(sock, b"250 2.0.0 Ok\r\n")
    assert replies.startswith(b"503 5.5.1") and replies.count(b"\r\n") == 2, replies
    sock.close()


def test_bdat_syntax_errors(server):
    sock = connect(server)
    transaction(sock)
    for bad in (b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 5 LAST LAST", b"BDAT 5 FIRST",
                b"BDAT 1234567890123456789012"):
        sock.sendall(bad + b"\r\n")
        assert readAll(sock, b"\r\n").startswith(b"501 5.5.4"), bad
    sock.close()


def test_data_after_bdat_and_data_with_binarymime_are_503(server):
    sock = connect(server)
    transaction(sock)
    sock.sendall(b"BDAT 5\r\nhelloDATA\r\n")
    replies = readAll(sock, b"503 ")
    assert replies.startswith(b"250 ") and b"503 5.5.1" in replies
    sock.sendall(b"RSET\r\n")
    readAll(sock, b"250 ")
    transaction(sock, b" BODY=BINARYMIME")
    sock.sendall(b"DATA\r\n")
    assert readAll(sock, b"\r\n").startswith(b"503 5.5.1")  # RFC 3030 §3
    sock.close()
    assert stored(server) == []


def test_last_twice_second_is_outside_a_transaction(server):
    sock = connect(server)
    transaction(sock)
    sock.sendall(b"BDAT %d LAST\r\n" % len(MSG) + MSG + b"BDAT 3 LAST\r\nabcNOOP\r\n")
    replies = readAll(sock, b"250 2.0.0 Ok\r\n")
    assert b"queued as" in replies and b"503 5.5.1" in replies
    sock.close()
    assert len(stored(server)) == 1


def test_rset_mid_bdat_stores_nothing(server):
    sock = connect(server)
    transaction(sock)
    sock.sendall(b"BDAT %d\r\n" % len(MSG) + MSG + b"RSET\r\nQUIT\r\n")
    readAll(sock, b"221 ")
    sock.close()
    assert stored(server) == []


def test_hop_limit_sees_a_bdat_message_as_a_data_one(server):
    looped = b"".join(b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                      for _ in range(101)) + MSG
    sock = connect(server)
    transaction(sock)
    sock.sendall(b"BDAT %d LAST\r\n" % len(looped) + looped)
    assert readAll(sock, b"\r\n").startswith(b"554 5.4.6")
    sock.close()
    assert stored(server) == []
