"""Clients that do not read, or never stop sending: memory and connection slots stay bounded.

Twisted buffers all a protocol writes and reads all a client sends.  A client
that pipelines commands without reading the answers made the server hold
every answer (EHLO: 20 times what was sent; RETR: a copy of the message per
7 octets); one that kept sending while a command was outstanding made it
hold every octet; and a connection closed with unread output stayed open
for as long as the client wanted, holding a slot of the connection limits.
"""

from __future__ import annotations

import select
import socket
import ssl
import time

import pytest
from hostile import (  # noqa: F401 - logged is a fixture
    bufferedOutput,
    drainCounting,
    errors,
    flood,
    logged,
    reading,
    serverSide,
)
from serverproc import waitUntil
from support import addUser, readAll, startServer
from test_pop3 import send

from twistmail.protocols.imap.server import IMAPServer
from twistmail.protocols.pop3 import POP3Server
from twistmail.protocols.smtp import SMTPServer

MiB = 1024 * 1024


def connect(port: int) -> socket.socket:
    sock = socket.socket()
    # Small kernel buffers, so what piles up is the server's own, and soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def stalls(sock: socket.socket, kind: type, command: bytes, limit: int = 8 * MiB):
    """Pipeline C{command} without reading: the server must stop reading, holding
    little.  Returns the server-side protocol and what remains of the last command."""
    proto = serverSide(sock, kind)
    sent, rest = flood(sock, command * 2000, lambda: not reading(proto), limit)
    assert bufferedOutput(proto) < 2 * MiB, bufferedOutput(proto)
    return proto, rest


def test_smtp_client_that_does_not_read_replies_is_held_back(server, logged):  # noqa: F811
    sock = connect(server.smtpPort)
    readAll(sock, b"\r\n")
    proto, rest = stalls(sock, SMTPServer, b"EHLO client.example\r\n")
    assert len(proto._buf) < 2 * MiB
    # Once the client reads, the server goes on and answers everything, in order.
    sock.sendall(rest + b"QUIT\r\n")
    assert drainCounting(sock, b"250 SIZE", b"221 2.0.0 Bye") > 1000
    sock.close()
    assert errors(logged) == []


def test_pop3_client_that_does_not_read_retrieved_messages_is_held_back(server):
    send(server, b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 50)
    sock = connect(server.pop3Port)
    readAll(sock, b"\r\n")
    sock.sendall(b"USER alice@example.test\r\nPASS secret\r\n")
    readAll(sock, b"+OK Authentication succeeded")
    # (a small limit: without flow control, each RETR sent is 50 KB more memory)
    proto, rest = stalls(sock, POP3Server, b"RETR 1\r\n", limit=256 * 1024)
    assert proto.buffered < 2 * MiB
    sock.sendall(rest + b"QUIT\r\n")
    assert drainCounting(sock, b" octets\r\n", b"+OK Bye") > 100
    sock.close()


def test_imap_client_that_does_not_read_answers_is_held_back(server):
    sock = connect(server.imapPort)
    readAll(sock, b"\r\n")
    proto, rest = stalls(sock, IMAPServer, b"a CAPABILITY\r\n")
    assert proto.reader.buffered < 2 * MiB
    sock.sendall(rest + b"z LOGOUT\r\n")
    assert drainCounting(sock, b"a OK CAPABILITY", b"z OK") > 1000
    sock.close()


def test_smtp_client_that_does_not_read_is_held_back_over_starttls(server):
    """The same over TLS: Twisted moves our producer to the TLS layer at STARTTLS.
    And QUIT still closes the connection (a TLS transport does not close while a
    producer is registered)."""
    sock = connect(server.smtpPort)
    readAll(sock, b"\r\n")
    sock.sendall(b"STARTTLS\r\n")
    readAll(sock, b"220 2.0.0")
    tls = TLSPipe(sock)
    proto = serverSide(sock, SMTPServer)
    count = 40000
    pending = tls.encrypt(b"EHLO client.example\r\n" * count)
    sock.setblocking(False)
    while reading(proto):
        select.select([], [sock], [], 0.1)
        try:
            pending = pending[sock.send(pending):]
        except BlockingIOError:
            pass
        assert pending, "the server kept reading"
    assert bufferedOutput(proto) < 2 * MiB
    pending += tls.encrypt(b"QUIT\r\n")
    # Once the client reads, everything is answered, in order, and the connection closes.
    received = tls.exchange(pending)
    assert received.count(b"250 SIZE") == count
    assert received.endswith(b"221 2.0.0 Bye\r\n")
    sock.close()


class TLSPipe:
    """A TLS client over a raw socket, so that what is sent can be cut anywhere."""

    def __init__(self, sock: socket.socket) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing,
                                    server_hostname="mx.example.test")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(self.outgoing.read())
                self.incoming.write(sock.recv(65536))
        sock.sendall(self.outgoing.read())

    def encrypt(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def exchange(self, pending: bytes, timeout: float = 60) -> bytes:
        """Send C{pending} while reading, until the server closes; what it said.
        (Twisted closes a TLS connection only once the client has answered its
        close_notify.)"""
        self.sock.setblocking(False)
        received = []
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "the server did not close the connection"
            readable, writable, _ = select.select([self.sock], [self.sock] if pending else [],
                                                  [], 1)
            if writable:
                try:
                    pending = pending[self.sock.send(pending):]
                except BlockingIOError:
                    pass
            if readable:
                data = self.sock.recv(1 << 20)
                if not data:
                    return b"".join(received)
                self.incoming.write(data)
                try:
                    while data:
                        data = self.tls.read(1 << 20)
                        received.append(data)
                except ssl.SSLWantReadError:
                    continue
                except ssl.SSLZeroReturnError:
                    data = b""
                if not data:  # the server's close_notify: answer it, as clients do
                    try:
                        self.tls.unwrap()
                    except ssl.SSLError:
                        pass
                    self.sock.setblocking(True)
                    self.sock.sendall(self.outgoing.read())
                    self.sock.setblocking(False)


def test_a_large_message_streams_in(dataDir):
    """Message data is spooled as it comes: the backlog limit is about commands,
    and a 30 MB DATA must not be held back by it."""
    addUser(dataDir, "alice@example.test")
    srv = startServer(dataDir, smtp={"max_message_size": 40 * MiB})
    try:
        sock = connect(srv.smtpPort)
        readAll(sock, b"\r\n")
        sock.sendall(b"EHLO x\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                     b"DATA\r\n")
        readAll(sock, b"354 ")
        line = b"x" * 998 + b"\r\n"
        chunk = line * 1000
        for _ in range(30):
            sock.sendall(chunk)
        sock.sendall(b".\r\nQUIT\r\n")
        replies = readAll(sock, b"221 ", timeout=60)
        assert b"250 2.0.0 Ok: queued as" in replies, replies
        sock.close()
    finally:
        srv.stop()


@pytest.fixture
def slowAuth(dataDir):
    """Failed logins answered after 3 s, and short idle timeouts."""
    addUser(dataDir, "alice@example.test")
    srv = startServer(dataDir, auth={"failure_delay": 3}, smtp={"timeout": 2},
                      pop3={"timeout": 2}, imap={"login_timeout": 2})
    yield srv
    srv.stop()


@pytest.mark.parametrize("protocol, kind, login, pending", [
    ("submission", SMTPServer, b"EHLO x\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==\r\n",
     lambda p: len(p._buf)),
    ("pop3", POP3Server, b"USER alice@example.test\r\nPASS wrong\r\n",
     lambda p: p.buffered),
    ("imap", IMAPServer, b"a LOGIN alice@example.test wrong\r\n", lambda p: p.reader.buffered),
])
def test_input_while_a_command_is_outstanding_is_held_back(slowAuth, protocol, kind, login,
                                                           pending):
    """While a login waits out its failure delay (or a delivery, an APPEND, a RETR),
    what the client pipelines behind it waits too: all of it, before."""
    sock = connect(slowAuth.ports[protocol])
    readAll(sock, b"\r\n")
    sock.sendall(login)
    proto = serverSide(sock, kind)
    flood(sock, b"NOOP\r\n" * 10000, lambda: not reading(proto), limit=8 * MiB)
    assert pending(proto) < 2 * MiB
    sock.close()


@pytest.mark.parametrize("protocol, kind, command", [
    ("smtp", SMTPServer, b"EHLO client.example\r\n"),
    ("pop3", POP3Server, b"CAPA\r\n"),
    ("imap", IMAPServer, b"a CAPABILITY\r\n"),
])
def test_client_that_stops_reading_does_not_keep_its_connection(slowAuth, protocol, kind,
                                                                command):
    """Idle past the timeout with answers left unread: the connection is aborted and
    its slot freed.  loseConnection alone waited for the client to read, forever."""
    limiter = slowAuth.service.getServiceNamed(
        f"smtp tcp:{slowAuth.ports['smtp']}:interface=127.0.0.1").factory.limiter
    sock = connect(slowAuth.ports[protocol])
    readAll(sock, b"\r\n")
    stalls(sock, kind, command)
    assert limiter.total == 1
    waitUntil(lambda: limiter.total == 0, 20, "the connection to be dropped")
    sock.close()


def test_pop3_commands_pipelined_behind_a_login_are_all_answered(slowAuth):
    """Twisted replayed them bare: the first error (STAT before login) went into the
    Deferred as an unhandled error, the rest were dropped, and the client hung."""
    sock = connect(slowAuth.pop3Port)
    readAll(sock, b"\r\n")
    sock.sendall(b"USER alice@example.test\r\nPASS wrong\r\nSTAT\r\nRETR 1 2\r\nNOOP\r\nQUIT\r\n")
    replies = readAll(sock, b"+OK Bye").split(b"\r\n")
    assert [r.split(b" ")[0] for r in replies if r] == [b"+OK", b"-ERR", b"-ERR", b"-ERR", b"-ERR",
                                                        b"+OK"], replies
    sock.close()
