"""The per-record deadline (Postfix's ``smtpd_per_record_deadline``), on SMTP, POP3 and IMAP.

A client that sends one byte every few seconds and never ends its line reset the
idle timer with every byte and held its connection (and a slot of the connection
limits) forever.  Now a line must be complete, and a long line or literal must move
at least L{flow.RECORD} octets, within the protocol's timeout of its first byte;
a client that sends complete commands slowly is not affected.

Over StringTransport with a task.Clock driving every timer: milliseconds, no sockets.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from twistmail import config as configmod
from twistmail.protocols import flow

PEER = IPv4Address("TCP", "203.0.113.9", 4321)


def _smtp(config, dataDir):
    from twistmail.auth.accounts import Accounts
    from twistmail.delivery.routing import RelayPolicy, Router
    from twistmail.protocols.smtp import SMTPFactory

    factory = SMTPFactory(config["smtp"], "mx.example.test",
                          Router(Accounts(dataDir), RelayPolicy([])), None, dataDir)
    return factory, config["smtp"]["timeout"]


def _pop3(config, dataDir):
    from twistmail.protocols.pop3 import POP3ServerFactory

    return POP3ServerFactory(config["pop3"], None), config["pop3"]["timeout"]


def _imap(config, dataDir):
    from twistmail.protocols.imap.server import IMAPFactory

    return IMAPFactory(config["imap"], None, dataDir), config["imap"]["login_timeout"]


#: (factory builder, a command answered before login, its answer, the timeout reply)
PROTOCOLS = {
    "smtp": (_smtp, b"NOOP\r\n", b"250 ", b"421 4.4.2 "),
    "pop3": (_pop3, b"CAPA\r\n", b"+OK", b"-ERR "),
    "imap": (_imap, b"a NOOP\r\n", b"a OK", b"* BYE "),
}


@pytest.fixture(params=sorted(PROTOCOLS))
def session(request, dataDir):
    """A connected protocol whose timers all run on a Clock."""
    yield from _connect(request.param, dataDir)


def _connect(name: str, dataDir: str):
    build, command, answer, bye = PROTOCOLS[name]
    factory, timeout = build(configmod.load(None), dataDir)
    clock = Clock()
    proto = factory.buildProtocol(PEER)
    proto.callLater = clock.callLater
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    transport.clear()
    yield proto, transport, clock, timeout, command, answer, bye
    if not transport.disconnecting:
        proto.connectionLost(None)


def test_a_dribbled_line_is_cut_off_at_the_timeout(session):
    """One byte every timeout/10 seconds, never a line end: the idle timer alone was
    reset by every byte and the connection lived forever."""
    proto, transport, clock, timeout, command, answer, bye = session
    for _ in range(9):
        proto.dataReceived(b"N")
        clock.advance(timeout / 10)
    assert not transport.disconnecting, transport.value()
    proto.dataReceived(b"N")
    with capturedLogs() as events:
        clock.advance(timeout / 10)  # the first byte came a whole timeout ago
    assert transport.disconnecting, "still connected after a whole timeout on one line"
    logged = [e for e in events if "not completed" in e["log_format"]]
    if bye != PROTOCOLS["pop3"][3]:
        [event] = logged
        assert event["client"] == PEER.host and event["timeout"] == timeout
    # else: POP3's idle timer counts from the last complete line, not the last byte, so
    # it ends a dribbler at the same moment (first: it was set first); the -ERR is new.
    assert bye in transport.value(), transport.value()
    # Nothing else is answered, and nothing runs on later.
    transport.clear()
    proto.dataReceived(b"\r\n" + command)
    clock.advance(10 * timeout)
    assert answer not in transport.value()


def test_complete_commands_sent_slowly_are_answered(session):
    """Each command (and each part of a line) well within the timeout: no cut-off,
    however long the session lasts."""
    proto, transport, clock, timeout, command, answer, bye = session
    for _ in range(10):
        clock.advance(timeout * 0.5)
        half = len(command) // 2
        proto.dataReceived(command[:half])
        clock.advance(timeout * 0.45)
        proto.dataReceived(command[half:])
        assert transport.value().count(answer) == 1, transport.value()
        transport.clear()
    assert not transport.disconnecting


@pytest.mark.parametrize("name", ["smtp", "imap"])  # POP3 closes at 512 octets a line
def test_a_long_line_that_keeps_moving_is_not_cut_off(name, dataDir):
    """A line (a literal without line ends, say) longer than L{flow.RECORD} on a slow
    link: each L{flow.RECORD} octets restart the deadline, so it is not killed while
    it moves."""
    session = _connect(name, dataDir)
    proto, transport, clock, timeout, command, answer, bye = next(session)
    for _ in range(6):
        proto.dataReceived(b"x" * (flow.RECORD // 2))
        clock.advance(timeout * 0.6)
    assert not transport.disconnecting
    assert bye not in transport.value()
    next(session, None)


def test_the_deadline_waits_while_the_server_does_not_read(session):
    """Reading paused (too much input waits for a command): the client cannot finish
    its line, so the deadline does not run meanwhile, and starts afresh after.  (The
    server stays active meanwhile, its output draining, so the idle timer is reset.)"""
    proto, transport, clock, timeout, command, answer, bye = session
    proto.dataReceived(b"NO")
    proto._flow.backlog(True)
    for _ in range(4):
        clock.advance(timeout / 2)
        proto.resetTimeout()
    assert not transport.disconnecting
    proto._flow.backlog(False)
    clock.advance(timeout * 0.5)
    proto.resetTimeout()
    clock.advance(timeout * 0.4)
    assert not transport.disconnecting
    clock.advance(timeout * 0.2)
    assert transport.disconnecting
    assert bye in transport.value()


class _TCPTransport(StringTransport):
    noDelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_responses_are_not_held_back_by_nagle(name, dataDir):
    """TCP_NODELAY on every connection: the small last segment of a large response
    (IMAP UID FETCH 1:* (FLAGS) of 100,000, a POP3 RETR of 1.6 MB) waited for the
    client's delayed ACK, 40 ms."""
    build = PROTOCOLS[name][0]
    factory, _ = build(configmod.load(None), dataDir)
    proto = factory.buildProtocol(PEER)
    transport = _TCPTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    assert transport.noDelay
    proto.connectionLost(None)
