"""Connection reuse against a real Postfix (Debian's), started by the test as the receiver.

twistmail relays through Postfix as its smarthost; Postfix's own log
(``connect from`` lines of its smtpd) says how many connections carried
the messages, and its maildir that each arrived once.
"""

from __future__ import annotations

import pytest
from postfixproc import Postfix
from relayenv import Internet, queueIds
from serverproc import waitUntil
from support import addUser, freePort, startServer
from test_relay_e2e import ALICE, submit
from twisted.internet import defer

from twistmail.relay.queue import RelayQueue

N = 6


@pytest.fixture
def postfix():
    with Postfix(freePort(), domains=["remote.test"]) as pf:
        yield pf


@pytest.fixture
def net():
    internet = Internet()
    yield internet
    internet.stop()


def relayThrough(net, dataDir, postfix, **overrides):
    addUser(dataDir, ALICE)
    return startServer(dataDir, relay=net.relayConfig(
        smarthost=f"smarthost.test:{postfix.port}", smarthost_tls="opportunistic",
        max_deliveries_per_domain=1, **overrides))


def submitAll(server) -> None:
    for i in range(N):
        submit(server.smtpPort, ["bob@remote.test"],
               f"From: {ALICE}\r\nSubject: reuse {i}\r\n\r\nmessage {i}\r\n".encode())


def test_several_messages_reach_postfix_over_one_connection(net, dataDir, postfix):
    server = relayThrough(net, dataDir, postfix)
    try:
        submitAll(server)
        waitUntil(lambda: postfix.delivered() >= N, 30, "Postfix to store every message")
        waitUntil(lambda: not queueIds(dataDir), 15, "twistmail's queue to empty")
    finally:
        server.stop()
    subjects = sorted(m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0] for m in postfix.messages())
    assert subjects == sorted(f"reuse {i}".encode() for i in range(N))  # each once
    assert postfix.connections() == 1, "\n".join(postfix.logLines())


def test_a_backlog_is_pipelined_across_messages_and_postfix_takes_each_once(
        net, dataDir, postfix):
    """Queued before the server starts, the messages wait for the one connection: each
    message's MAIL, RCPT and DATA follow the previous one's "." and RSET before their
    replies (RFC 2920 §3.1), which Postfix's smtpd must take as pipelined commands."""
    queue = RelayQueue(dataDir, run=lambda f, *a: defer.maybeDeferred(f, *a))
    for i in range(N):
        queue.enqueue(ALICE, ["bob@remote.test"], lambda i=i: [
            f"From: {ALICE}\r\nSubject: backlog {i}\r\n\r\nmessage {i}\r\n".encode()],
            origin="smtp")
    server = relayThrough(net, dataDir, postfix)
    try:
        waitUntil(lambda: postfix.delivered() >= N, 30, "Postfix to store every message")
        waitUntil(lambda: not queueIds(dataDir), 15, "twistmail's queue to empty")
    finally:
        server.stop()
    subjects = sorted(m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0] for m in postfix.messages())
    assert subjects == sorted(f"backlog {i}".encode() for i in range(N))
    assert postfix.connections() == 1, "\n".join(postfix.logLines())
    assert not [line for line in postfix.logLines() if "pipelining" in line or "warning" in line]


def test_without_reuse_postfix_sees_a_connection_per_message(net, dataDir, postfix):
    server = relayThrough(net, dataDir, postfix, connection_reuse=False)
    try:
        submitAll(server)
        waitUntil(lambda: postfix.delivered() >= N, 30, "Postfix to store every message")
    finally:
        server.stop()
    assert postfix.connections() == N
