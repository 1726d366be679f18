"""Passwords without TLS: only from the listener's own address, or from [auth] plaintext_networks.

Dovecot's rule (local IP == remote IP counts as secure): 127.0.0.1 talking to a
listener on 127.0.0.1 is the same host, but 127.0.0.2 talking to 127.0.0.1 is
treated like any other client.  The clients below bind 127.0.0.2 as their source
address to be that other client.
"""

from __future__ import annotations

import base64
import smtplib
import socket

import pytest
from support import addUser, readAll, startServer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from twistmail import config as configmod
from twistmail._netaddr import Networks
from twistmail.protocols.imap.server import IMAPFactory
from twistmail.protocols.pop3 import POP3ServerFactory

ALICE = "alice@example.test"
OTHER = "127.0.0.2"


@pytest.fixture
def loopback(dataDir):
    addUser(dataDir, ALICE)
    srv = startServer(dataDir)
    yield srv
    srv.stop()


@pytest.fixture
def trusting(dataDir):
    addUser(dataDir, ALICE)
    srv = startServer(dataDir, auth={"plaintext_networks": ["127.0.0.2/32"]})
    yield srv
    srv.stop()


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def pop3Login(port: int, source: str) -> tuple[bytes, bytes, bytes]:
    with connect(port, source) as sock:
        readAll(sock, b"\r\n")
        sock.sendall(b"CAPA\r\n")
        capa = readAll(sock, b"\r\n.\r\n")
        sock.sendall(b"USER " + ALICE.encode() + b"\r\n")
        user = readAll(sock, b"\r\n")
        sock.sendall(b"PASS secret\r\n")
        return capa, user, readAll(sock, b"\r\n")


def imapLogin(port: int, source: str) -> tuple[bytes, bytes]:
    with connect(port, source) as sock:
        readAll(sock, b"\r\n")
        sock.sendall(b"a CAPABILITY\r\n")
        capa = readAll(sock, b"a OK")
        sock.sendall(b"b LOGIN " + ALICE.encode() + b" secret\r\n")
        return capa, readAll(sock, b"\r\n")


def submissionAuth(port: int, source: str) -> tuple[bool, int]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo()
        offered = client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(
            b"\0alice@example.test\0secret").decode())
        return offered, code


def test_another_loopback_address_is_not_the_listeners_own(loopback):
    offered, code = submissionAuth(loopback.ports["submission"], OTHER)
    assert (offered, code) == (False, 538)
    capa, login = imapLogin(loopback.imapPort, OTHER)
    assert b"LOGINDISABLED" in capa and b"AUTH=PLAIN" not in capa
    assert login.startswith(b"b NO"), login
    capa, user, password = pop3Login(loopback.pop3Port, OTHER)
    assert b"\r\nUSER\r\n" not in capa
    assert user.startswith(b"-ERR [AUTH]") and password.startswith(b"-ERR"), (user, password)


def test_the_listeners_own_address_may_send_passwords(loopback):
    assert submissionAuth(loopback.ports["submission"], "127.0.0.1") == (True, 235)
    capa, login = imapLogin(loopback.imapPort, "127.0.0.1")
    assert b"LOGINDISABLED" not in capa and login.startswith(b"b OK"), login
    capa, user, password = pop3Login(loopback.pop3Port, "127.0.0.1")
    assert b"\r\nUSER\r\n" in capa and password.startswith(b"+OK"), password


def test_plaintext_networks_names_other_clients(trusting):
    assert submissionAuth(trusting.ports["submission"], OTHER) == (True, 235)
    capa, login = imapLogin(trusting.imapPort, OTHER)
    assert b"LOGINDISABLED" not in capa and login.startswith(b"b OK"), login
    capa, user, password = pop3Login(trusting.pop3Port, OTHER)
    assert password.startswith(b"+OK"), password


def transport(peer: str, host: str = "127.0.0.1") -> StringTransport:
    return StringTransport(hostAddress=IPv4Address("TCP", host, 143),
                           peerAddress=IPv4Address("TCP", peer, 40000))


@pytest.mark.parametrize("peer, allowed", [("127.0.0.1", True), ("127.0.0.2", False),
                                           ("192.0.2.1", False)])
def test_factories_built_without_security_use_the_safe_rule(tmp_path, peer, allowed):
    config = configmod.load(None)
    imap = IMAPFactory(config["imap"], portal=None, spoolDir=str(tmp_path)).buildProtocol(None)
    t = transport(peer)
    imap.makeConnection(t)
    imap.dataReceived(b"a CAPABILITY\r\n")
    assert (b"LOGINDISABLED" not in t.value()) is allowed, t.value()
    imap.connectionLost(None)

    pop = POP3ServerFactory(config["pop3"], portal=None).buildProtocol(None)
    t = transport(peer)
    pop.makeConnection(t)
    pop.dataReceived(b"CAPA\r\n")
    assert (b"\r\nUSER\r\n" in t.value()) is allowed, t.value()
    pop.connectionLost(None)


@pytest.mark.parametrize("networks, host, inside", [
    (["127.0.0.0/8"], "127.0.0.2", True),
    (["127.0.0.0/8"], "::ffff:127.0.0.2", True),  # a dual-stack listener's view of IPv4
    (["10.0.0.0/8"], "::ffff:127.0.0.2", False),
    (["2001:db8::/32"], "2001:db8::1%eth0", True),
    (["::1/128"], "::1", True),
    ([], "127.0.0.1", False),
    (["0.0.0.0/0"], "unix-socket", False),
    (["0.0.0.0/0"], "", False),
])
def test_networks_contains(networks, host, inside):
    assert (host in Networks(networks)) is inside
