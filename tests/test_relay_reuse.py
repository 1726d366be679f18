"""Outbound connection reuse (Postfix's connection cache) and SMTPS to a smarthost."""

from __future__ import annotations

import pytest
from certs import makeCerts
from smtpsink import Script, startSink
from support import onReactor
from test_relay_sender import policy, send, settings, smarthostSettings
from twisted.internet import reactor, task

from twistmail.mtasts import ENFORCE
from twistmail.relay.mx import Hop
from twistmail.relay.sender import DEFERRED, SENT, RelaySender, trustRootFromFile

HOP = [Hop("mx.remote.test", ("127.0.0.1",))]


@pytest.fixture
def sink():
    s = startSink()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def certs():
    return makeCerts("localhost")


def sendMany(sender, n, hops=HOP):
    return [send(sender, hops, [f"r{i}@remote.test"], message=f"Subject: {i}\r\n\r\n{i}\r\n".encode())
            for i in range(n)]


def commands(sink, verb):
    return [line for who, line in sink.transcript if who == "C" and line.startswith(verb)]


def test_twenty_messages_to_one_destination_share_one_connection(sink):
    results = sendMany(RelaySender(reactor, settings(sink.port)), 20)
    assert all(r.kind == SENT for one in results for r in one.values())
    assert sink.connections == 1
    assert [m.recipients for m in sink.messages] == [[f"r{i}@remote.test"] for i in range(20)]
    # Pipelined: the reply to each "." ends its transaction (RFC 5321 §4.1.1.4), no RSET.
    assert commands(sink, "RSET") == []
    assert len(commands(sink, "EHLO")) == 1


def test_an_idle_connection_is_closed_after_the_cache_time(sink):
    clock = task.Clock()
    sender = RelaySender(reactor, settings(sink.port, cacheTime=2), clock=clock)
    sendMany(sender, 1)
    onReactor(clock.advance, 1.9)
    sendMany(sender, 1)  # still parked: reused
    assert sink.connections == 1 and sink.active == 1
    onReactor(clock.advance, 2)
    onReactor(sink.allClosed)
    assert commands(sink, "QUIT") == ["QUIT"]
    sendMany(sender, 1)
    assert sink.connections == 2 and len(sink.messages) == 3


def test_a_connection_carries_at_most_max_per_connection_messages(sink):
    sendMany(RelaySender(reactor, settings(sink.port, maxPerConnection=3)), 7)
    assert len(sink.messages) == 7
    assert sink.connections == 3  # 3 + 3 + 1
    assert len(commands(sink, "QUIT")) >= 2


def test_reuse_can_be_switched_off(sink):
    sendMany(RelaySender(reactor, settings(sink.port, connectionReuse=False)), 3)
    assert sink.connections == 3 and len(sink.messages) == 3


def test_a_reused_connection_closed_by_the_server_retries_on_a_fresh_one(sink):
    mails = []
    # The server closes the connection (421) at the second transaction's MAIL FROM.
    sink.script.mail = lambda sender: mails.append(sender) or \
        ("421 4.4.2 closing" if len(mails) == 2 else None)
    results = sendMany(RelaySender(reactor, settings(sink.port)), 2)
    assert [r.kind for one in results for r in one.values()] == [SENT, SENT]
    assert [m.recipients for m in sink.messages] == [["r0@remote.test"], ["r1@remote.test"]]
    assert sink.connections == 2


def test_a_server_that_drops_parked_connections_still_gets_each_message_once():
    sink = startSink(script=Script(closeAfterMessage=True))
    try:
        results = sendMany(RelaySender(reactor, settings(sink.port)), 5)
        assert all(r.kind == SENT for one in results for r in one.values())
        assert [m.recipients for m in sink.messages] == [[f"r{i}@remote.test"] for i in range(5)]
        assert sink.connections == 5
    finally:
        sink.stop()


def test_after_the_data_was_sent_a_reused_connection_is_never_retried(sink):
    seen = []
    sink.script.data = lambda received: seen.append(received) or \
        ("421 4.3.0 closing" if len(seen) == 2 else None)
    results = sendMany(RelaySender(reactor, settings(sink.port)), 2)
    [second] = results[1].values()
    assert second.kind == DEFERRED and second.reply == "421 4.3.0 closing"
    assert len(sink.dataSeen) == 2 and len(sink.messages) == 1  # not offered a third time
    assert sink.connections == 1


def test_a_connection_is_reused_only_at_the_same_tls_level(certs, tmp_path):
    """An opportunistic (unverified) connection never carries a message under MTA-STS enforce."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.caPEM)
    sink = startSink(script=Script(tlsOptions=certs.serverOptions()))
    try:
        sender = RelaySender(reactor, settings(sink.port, trustRoot=trustRootFromFile(str(ca))))
        plain = [Hop("localhost", ("127.0.0.1",))]
        enforced = [Hop("localhost", ("127.0.0.1",), policy=policy(ENFORCE))]
        for hops in (plain, enforced, enforced, plain):
            [result] = send(sender, hops).values()
            assert result.kind == SENT
        assert sink.connections == 2  # one opportunistic, one verified; each reused once
    finally:
        sink.stop()


def test_smarthost_over_implicit_tls(certs, tmp_path):
    sink = startSink(script=Script(users={"relayuser": "s3cret pass"}),
                     implicitTLS=certs.serverOptions())
    try:
        sender = RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path, tls="implicit"))
        results = sendMany(sender, 3, [Hop("localhost", ("127.0.0.1",))])
        assert all(r.kind == SENT for one in results for r in one.values())
        assert all(m.tls and m.user == "relayuser" for m in sink.messages)
        assert not commands(sink, "STARTTLS") and sink.connections == 1
    finally:
        sink.stop()


def test_smarthost_over_implicit_tls_with_a_certificate_we_cannot_verify(certs, tmp_path):
    other = makeCerts("localhost")
    sink = startSink(script=Script(users={"relayuser": "s3cret pass"}),
                     implicitTLS=other.serverOptions())
    try:
        sender = RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path, tls="implicit"))
        [result] = send(sender, [Hop("localhost", ("127.0.0.1",))]).values()
        assert result.kind == DEFERRED and result.status == "4.4.2"
        assert sink.messages == [] and not commands(sink, "AUTH")
    finally:
        sink.stop()
