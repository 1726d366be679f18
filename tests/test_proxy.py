"""The PROXY protocol (HAProxy v1/v2) on listeners marked ``haproxy:``; refused elsewhere."""

from __future__ import annotations

import socket
import struct

import pytest
from support import addUser, freePort, readAll, startServer, storedMessages
from test_tls import insecure
from twisted.internet import address, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from twistmail.protocols.proxyheader import ProxyHeaderFactory

CLIENT = "192.0.2.7"
V1 = f"PROXY TCP4 {CLIENT} 198.51.100.1 40000 25\r\n".encode()
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(source: str = CLIENT, local: bool = False) -> bytes:
    if local:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    body = socket.inet_aton(source) + socket.inet_aton("198.51.100.1") + struct.pack("!HH", 40000, 25)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


# -- unit: the header reader over a StringTransport ----------------------------------------

class Recorder(protocol.Protocol):
    def __init__(self, addr):
        self.addr = addr
        self.received = b""
        self.lost = False

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = True


class RecordingFactory(protocol.Factory):
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        p = Recorder(addr)
        self.built.append(p)
        return p


def connected(networks=("127.0.0.0/8",), peer="127.0.0.1"):
    clock = Clock()
    inner = RecordingFactory()
    factory = ProxyHeaderFactory(inner, networks, clock)
    transport = StringTransport(peerAddress=address.IPv4Address("TCP", peer, 5000),
                                hostAddress=address.IPv4Address("TCP", "127.0.0.1", 25))
    reader = factory.buildProtocol(transport.getPeer())
    reader.makeConnection(transport)
    return clock, inner, transport, reader


@pytest.mark.parametrize("header", [V1, v2()], ids=["v1", "v2"])
def test_header_read_byte_by_byte_then_the_protocol_is_built_for_the_real_client(header):
    clock, inner, transport, reader = connected()
    for i in range(len(header)):
        assert not inner.built  # nothing is built (no greeting, no limit) before the header
        reader.dataReceived(header[i:i + 1])
    reader.dataReceived(b"EHLO x\r\n")
    [p] = inner.built
    assert p.addr.host == CLIENT
    assert p.transport.getPeer().host == CLIENT
    assert p.transport.getHost().host == "198.51.100.1"
    assert p.received == b"EHLO x\r\n"
    clock.advance(60)
    assert not transport.disconnecting
    reader.connectionLost(None)
    assert p.lost


def test_v1_tcp6():
    _, inner, _, reader = connected()
    reader.dataReceived(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n")
    assert inner.built[0].transport.getPeer().host == "2001:db8::7"


def test_header_and_data_in_one_segment():
    _, inner, _, reader = connected()
    reader.dataReceived(v2() + b"EHLO x\r\n")
    assert inner.built[0].received == b"EHLO x\r\n"


@pytest.mark.parametrize("header", [v2(local=True), b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
def test_health_checks_keep_the_connection_addresses(header):
    _, inner, _, reader = connected()
    reader.dataReceived(header)
    [p] = inner.built
    assert p.addr.host == "127.0.0.1" and p.transport.getPeer().host == "127.0.0.1"


@pytest.mark.parametrize("data", [b"EHLO x\r\n", b"PROXY TCP4 nonsense\r\n", b"PROXY " + b"1" * 200,
                                  V2_SIGNATURE + b"\x21\x11\xff\xff",
                                  b"PROXY TCP4 <x>\x00 198.51.100.1 1 2\r\n",
                                  b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
                                  b"PROXY TCP4 192.0.2.7 198.51.100.1 1 99999\r\n"],
                         ids=["smtp", "bad-v1", "long-v1", "huge-v2", "v1-not-an-address",
                              "v1-wrong-family", "v1-bad-port"])
def test_garbage_header_closes_without_building(data):
    _, inner, transport, reader = connected()
    reader.dataReceived(data)
    assert transport.disconnected and not inner.built and transport.value() == b""


def test_no_header_in_time_closes():
    clock, inner, transport, reader = connected()
    reader.dataReceived(V1[:10])
    clock.advance(5)
    assert transport.disconnected and not inner.built


def test_header_from_outside_the_proxy_networks_is_refused():
    _, inner, transport, reader = connected(networks=("10.0.0.0/8",), peer="127.0.0.1")
    assert transport.disconnected
    reader.dataReceived(V1)
    assert not inner.built


# -- over loopback: the real service tree --------------------------------------------------

@pytest.fixture
def logs():
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def proxied(dataDir):
    addUser(dataDir, "alice@example.test")
    marked = {p: freePort() for p in ("smtp", "pop3", "imap", "pop3s")}
    srv = startServer(
        # The plaintext-password rule sees the proxied client too: let it log in.
        dataDir, server={"max_connections_per_ip": 1}, auth={"plaintext_networks": ["192.0.2.0/24"]},
        listen={p: [f"tcp:{freePort()}:interface=127.0.0.1",
                    f"haproxy:tcp:{port}:interface=127.0.0.1"] for p, port in marked.items()})
    srv.marked = marked
    yield srv
    srv.stop()


def connect(port: int, header: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(header)
    return sock


def smtpDeliver(sock: socket.socket, greeted: bool = False) -> bytes:
    """A whole SMTP transaction to alice; the last reply."""
    if not greeted:
        assert readAll(sock, b"\r\n").startswith(b"220 ")
    for line in (b"HELO client.example\r\n", b"MAIL FROM:<bob@example.net>\r\n",
                 b"RCPT TO:<alice@example.test>\r\n", b"DATA\r\n"):
        sock.sendall(line)
        readAll(sock, b"\r\n")
    sock.sendall(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    return readAll(sock, b"\r\n")


@pytest.mark.parametrize("header", [V1, v2()], ids=["v1", "v2"])
def test_smtp_received_header_and_logs_show_the_proxied_client(proxied, logs, header):
    with connect(proxied.marked["smtp"], header) as sock:
        assert smtpDeliver(sock).startswith(b"250")
    [message] = storedMessages(proxied.dataDir, "alice@example.test")
    assert f"[{CLIENT}]".encode() in message.split(b"\r\n\r\n")[0]
    assert any(f"client={CLIENT}" in line for line in logs)


def test_per_address_limit_counts_the_proxied_client(proxied):
    port = proxied.marked["smtp"]
    first = connect(port, v2(CLIENT))
    assert readAll(first, b"\r\n").startswith(b"220 ")
    # Same real client behind the balancer: over its limit of 1.
    with connect(port, v2(CLIENT)) as second:
        assert b"421 4.7.0 Too many connections from your address" in readAll(second, b"\r\n")
    # Another client through the same balancer (same 127.0.0.1 socket peer): welcome.
    with connect(port, v2("192.0.2.8")) as third:
        assert readAll(third, b"\r\n").startswith(b"220 ")
    first.close()


@pytest.mark.parametrize("protocol,login,greeting", [
    ("pop3", [b"USER alice@example.test\r\n", b"PASS wrong\r\n"], b"+OK"),
    ("imap", [b"a LOGIN alice@example.test wrong\r\n"], b"* OK"),
])
def test_login_failures_are_keyed_on_the_proxied_client(proxied, logs, protocol, login, greeting):
    with connect(proxied.marked[protocol], V1) as sock:
        assert readAll(sock, b"\r\n").startswith(greeting)
        for line in login:
            sock.sendall(line)
            reply = readAll(sock, b"\r\n")
        assert b"-ERR" in reply or b"NO" in reply
    failures = [line for line in logs if "login" in line and "alice@example.test" in line]
    assert failures and all(f"client={CLIENT}" in line for line in failures)


def test_implicit_tls_listener_reads_the_header_before_the_handshake(proxied):
    context = insecure()
    raw = connect(proxied.marked["pop3s"], V1)
    with context.wrap_socket(raw, server_hostname="mx.example.test") as tls:
        assert readAll(tls, b"\r\n").startswith(b"+OK")


def test_marked_listener_closes_a_client_without_header(proxied):
    with connect(proxied.marked["smtp"], b"EHLO x\r\n") as sock:
        sock.settimeout(10)
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""  # aborted
        assert data == b""  # closed, no greeting


def test_unmarked_listener_refuses_a_proxy_line_and_keeps_the_address(proxied, logs):
    with connect(proxied.smtpPort) as sock:
        assert readAll(sock, b"\r\n").startswith(b"220 ")
        sock.sendall(V1)
        try:
            reply = readAll(sock, b"\r\n")
        except (ConnectionError, AssertionError):
            reply = b""  # closed: also a refusal
        assert not reply or reply[:1] == b"5"
        if reply:
            assert smtpDeliver(sock, greeted=True).startswith(b"250")
            [message] = storedMessages(proxied.dataDir, "alice@example.test")
            assert b"[127.0.0.1]" in message and CLIENT.encode() not in message
    assert not any(f"client={CLIENT}" in line for line in logs)



def test_starttls_works_behind_the_proxy_and_the_client_stays_the_proxied_one(proxied, logs):
    header = b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 110\r\n"  # not a plaintext network
    context = insecure()
    raw = connect(proxied.marked["pop3"], header)
    assert readAll(raw, b"\r\n").startswith(b"+OK")
    raw.sendall(b"USER alice@example.test\r\n")
    assert readAll(raw, b"\r\n").startswith(b"-ERR")  # no passwords in the clear from there
    raw.sendall(b"STLS\r\n")
    assert readAll(raw, b"\r\n").startswith(b"+OK")
    with context.wrap_socket(raw, server_hostname="mx.example.test") as tls:
        tls.sendall(b"USER alice@example.test\r\n")
        assert readAll(tls, b"\r\n").startswith(b"+OK")
        tls.sendall(b"PASS secret\r\n")
        assert readAll(tls, b"\r\n").startswith(b"+OK")
    assert any("client=203.0.113.5" in line for line in logs)
