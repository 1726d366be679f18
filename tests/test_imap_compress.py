"""COMPRESS=DEFLATE (RFC 4978): imaplib over loopback, plain and over TLS, and a
decompression bomb over StringTransport."""

from __future__ import annotations

import imaplib
import ssl
import zlib

import pytest
from imapwire import RawIMAP
from support import startServer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistmail import config as configmod
from twistmail.protocols.imap import compress
from twistmail.protocols.imap import server as imapserver

ALICE = "alice@example.test"


class _Deflating:
    """imaplib with COMPRESS DEFLATE: after the tagged OK, every octet both ways is raw deflate."""

    def compress(self) -> None:
        imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))
        typ, data = self._simple_command("COMPRESS", "DEFLATE")
        assert typ == "OK", data
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        self._plain = b""
        self.wireBytes = 0  # compressed octets received

    def send(self, data: bytes) -> None:
        if getattr(self, "_deflate", None) is not None:
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        super().send(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise imaplib.IMAP4.abort("connection closed")
        self.wireBytes += len(chunk)
        self._plain += self._inflate.decompress(chunk)

    def read(self, size: int) -> bytes:
        if getattr(self, "_inflate", None) is None:
            return super().read(size)
        while len(self._plain) < size:
            self._fill()
        out, self._plain = self._plain[:size], self._plain[size:]
        return out

    def readline(self) -> bytes:
        if getattr(self, "_inflate", None) is None:
            return super().readline()
        while b"\n" not in self._plain:
            self._fill()
        end = self._plain.index(b"\n") + 1
        out, self._plain = self._plain[:end], self._plain[end:]
        return out


class DeflatingIMAP4(_Deflating, imaplib.IMAP4):
    pass


class DeflatingIMAP4_SSL(_Deflating, imaplib.IMAP4_SSL):
    pass


BIG = b"Subject: compressible\r\n\r\n" + b"All work and no play makes Jack a dull boy.\r\n" * 5000


def _session(client) -> None:
    assert "COMPRESS=DEFLATE" in client.capabilities or b"COMPRESS=DEFLATE" in \
        client.capability()[1][0].split()
    client.login(ALICE, "secret")
    assert b"COMPRESS=DEFLATE" in client.capability()[1][0].split()
    client.compress()
    assert client.append("INBOX", None, None, BIG)[0] == "OK"
    client.select("INBOX")
    before = client.wireBytes
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == BIG
    assert client.wireBytes - before < len(BIG) / 20, "the answer came compressed"
    typ, data = client._simple_command("COMPRESS", "DEFLATE")
    assert typ == "NO" and data[0].startswith(b"[COMPRESSIONACTIVE]"), data
    assert client.noop()[0] == "OK"
    client.logout()


def test_imaplib_with_compression(server):
    _session(DeflatingIMAP4("127.0.0.1", server.imapPort, timeout=10))


def test_compression_over_tls(dataDir):
    from support import addUser

    addUser(dataDir, ALICE)
    srv = startServer(dataDir)
    try:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _session(DeflatingIMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=context,
                                    timeout=10))
    finally:
        srv.stop()


def test_compress_needs_login_and_deflate(server):
    with RawIMAP(server.imapPort) as client:
        assert client.command("COMPRESS DEFLATE")[1].startswith(b"BAD")
        client.login()
        assert client.command("COMPRESS GZIP")[1].startswith(b"BAD")
        assert client.command("COMPRESS")[1].startswith(b"BAD")
        assert client.command("NOOP")[1].startswith(b"OK"), "still uncompressed"


# -- hostile: over StringTransport ---------------------------------------------------------


@pytest.fixture
def compressed(dataDir):
    """A logged-in session (state set by hand) that has sent COMPRESS DEFLATE."""

    config = configmod.load(None, {"server": {"data_dir": dataDir}})
    factory = imapserver.IMAPFactory(config["imap"], None, dataDir)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    clock = Clock()
    proto.callLater = clock.callLater
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
    proto.makeConnection(transport)
    proto.state = "auth"
    proto.dataReceived(b"c1 COMPRESS DEFLATE\r\n")
    assert transport.value().endswith(b"c1 OK DEFLATE active\r\n")
    transport.clear()
    yield proto, transport, clock
    proto.connectionLost(None)


def test_decompression_bomb_meets_the_line_limit_with_bounded_memory(compressed, monkeypatch):
    """64 MiB of one never-ending line, 64 KB compressed, sent at once (the backlog
    limit made 16 KiB to keep the test fast; the ratio is what matters): the
    reader drops the line as it comes, at most L{compress.PER_TURN} octets are
    inflated per reactor turn, the transport stops reading while compressed
    input waits, and the next command is answered."""
    proto, transport, clock = compressed
    monkeypatch.setattr(imapserver, "MAX_BACKLOG", 16 * 1024)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    line = b"x" * (4 * 1024 * 1024)
    bomb = deflate.compress(b"a1 NOOP ") + b"".join(deflate.compress(line) for _ in range(16))
    bomb += deflate.compress(b"\r\na2 NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
    proto.dataReceived(bomb)
    assert transport.producerState == "paused"
    biggest, turns = proto.reader.buffered, 0
    while clock.getDelayedCalls() and turns < 10_000:
        clock.advance(0)
        turns += 1
        biggest = max(biggest, proto.reader.buffered)
    assert turns >= 64 * 1024 * 1024 // compress.PER_TURN - 1, "inflated over many turns"
    assert biggest <= compress.CHUNK
    assert transport.producerState == "producing"
    answers = zlib.decompressobj(-15).decompress(transport.value())
    assert b"BAD Command line too long" in answers and answers.endswith(b"a2 OK NOOP completed\r\n")


def test_garbage_instead_of_deflate_closes_the_connection(compressed):
    proto, transport, _ = compressed
    proto.dataReceived(b"\xff" * 64)
    assert transport.disconnecting


@pytest.mark.interop
def test_mbsync_syncs_over_compression(server, tmp_path):
    """isync (Debian's mbsync 1.4) turns COMPRESS on by itself when it is offered."""
    from test_interop import run
    from test_interop_imap import Mbsync, deliver, message

    deliver(server, message(1), message(2))
    mbsync = Mbsync(server, tmp_path)
    result = run([mbsync.binary, "-c", str(mbsync.rc), "-D", "-a"])
    assert result.returncode == 0, result.stdout[-2000:]
    assert ">>> 2 COMPRESS DEFLATE" in result.stdout
    assert sorted(b"interop" in body for body in mbsync.files().values()) == [True, True]
