"""twistmail.protocols.tcp.writeNow: data sent in the call when a plain TCP socket takes it,
otherwise through the transport's buffer, always in order."""

from __future__ import annotations

import socket

from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport

from twistmail.protocols.tcp import writeNow


def connection():
    ours, peer = socket.socketpair()
    reactor = MemoryReactor()
    transport = tcp.Connection(ours, protocol.Protocol(), reactor)
    transport.connected = 1
    return transport, peer, reactor


def received(peer: socket.socket) -> bytes:
    peer.setblocking(False)
    out = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_sent_at_once_without_watching_the_socket():
    transport, peer, reactor = connection()
    writeNow(transport, b"MAIL FROM:<a@example.test>\r\n")
    assert received(peer) == b"MAIL FROM:<a@example.test>\r\n"
    assert transport not in reactor.getWriters()


def test_behind_buffered_data_it_waits_its_turn():
    transport, peer, reactor = connection()
    transport.write(b"first ")
    writeNow(transport, b"second")
    assert received(peer) == b""
    assert transport._tempDataBuffer == [b"first ", b"second"]
    assert transport in reactor.getWriters()


def test_what_the_socket_does_not_take_is_buffered_in_order():
    transport, peer, reactor = connection()
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes
    writeNow(transport, data)
    sent = received(peer)
    assert 0 < len(sent) < len(data)
    assert sent + b"".join(transport._tempDataBuffer) == data
    assert transport in reactor.getWriters()


def test_tls_and_other_transports_use_their_own_write():
    transport, peer, reactor = connection()
    transport.TLS = True  # after STARTTLS: never the raw socket
    written: list[bytes] = []
    transport.write = written.append
    writeNow(transport, b"EHLO x\r\n")
    assert written == [b"EHLO x\r\n"] and received(peer) == b""
    other = StringTransport()  # a wrapper (SMTPS) or a test's transport
    writeNow(other, b"QUIT\r\n")
    assert other.value() == b"QUIT\r\n"
