"""Outbound SMTP (RelaySender) against a scripted receiving server on loopback."""

from __future__ import annotations

import io
import socket

import pytest
from certs import makeCerts
from smtpsink import Script, startSink
from support import freePort, onReactor
from twisted.internet import defer, reactor

from twistmail.relay.mx import Hop
from twistmail.relay.sender import (
    DEFERRED,
    FAILED,
    SENT,
    RelaySender,
    SenderSettings,
    trustRootFromFile,
)

MESSAGE = b"From: a@example.test\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n..two\r\n"


def settings(port, **kw) -> SenderSettings:
    kw.setdefault("connectTimeout", 5)
    kw.setdefault("commandTimeout", 5)
    return SenderSettings(heloName="relay.example.test", port=port, **kw)


def send(sender, hops, recipients=("bob@remote.test",), message=MESSAGE, mailFrom="a@example.test",
         origin="smtp", **context):
    """C{context}: more of what the runner tells the sender ("requiretls", ...)."""
    opened = []

    def openMessage():
        f = io.BytesIO(message)
        opened.append(f)
        return defer.succeed(f)

    results = onReactor(lambda: sender.send(hops, mailFrom, list(recipients), openMessage,
                                            {"id": "T1", "domain": "remote.test",
                                             "origin": origin, **context}))
    assert all(f.closed for f in opened)
    return results


@pytest.fixture
def sink():
    s = startSink()
    yield s
    s.stop()


def closedPort() -> int:
    return freePort()  # nothing listens there once the probe socket is closed


def test_delivers_the_exact_message_with_dot_stuffing(sink):
    # A line starting with "." exactly at FileSender's 16 KiB chunk boundary, too.
    filler = b"x" * (16384 - len(MESSAGE) - 2) + b"\r\n"
    message = MESSAGE + filler + b".at the boundary\r\n"
    sender = RelaySender(reactor, settings(sink.port))
    results = send(sender, [Hop("mx.remote.test", ("127.0.0.1",))],
                   ["bob@remote.test", '"odd name"@remote.test'], message)
    assert {r.kind for r in results.values()} == {SENT}
    assert results["bob@remote.test"].reply == "250 2.0.0 Ok: queued"
    assert results["bob@remote.test"].host == "mx.remote.test"
    [got] = sink.messages
    assert got.data == message
    assert got.sender == "a@example.test"
    assert got.recipients == ["bob@remote.test", '"odd name"@remote.test']
    assert ("C", "EHLO relay.example.test") in sink.transcript


def test_null_sender_is_sent_as_empty_path(sink):
    send(RelaySender(reactor, settings(sink.port)), [Hop("mx", ("127.0.0.1",))], mailFrom="")
    assert ("C", "MAIL FROM:<>") in sink.transcript
    assert sink.messages[0].sender == ""


def test_results_per_recipient(sink):
    sink.script.rcpt = lambda rcpt: {"gone@remote.test": "550 5.1.1 no such user",
                                     "full@remote.test": "452 4.2.2 mailbox full"}.get(rcpt)
    results = send(RelaySender(reactor, settings(sink.port)), [Hop("mx", ("127.0.0.1",))],
                   ["ok@remote.test", "gone@remote.test", "full@remote.test"])
    assert results["ok@remote.test"].kind == SENT
    assert results["gone@remote.test"].kind == FAILED
    assert results["gone@remote.test"].reply == "550 5.1.1 no such user"
    assert results["gone@remote.test"].status == "5.1.1"
    assert results["full@remote.test"].kind == DEFERRED
    assert sink.messages[0].recipients == ["ok@remote.test"]


def test_data_reply_applies_to_accepted_recipients(sink):
    sink.script.data = lambda received: "451 4.3.0 try again later"
    sink.script.rcpt = lambda rcpt: "550 5.1.1 unknown" if rcpt.startswith("x") else None
    results = send(RelaySender(reactor, settings(sink.port)), [Hop("mx", ("127.0.0.1",))],
                   ["a@remote.test", "x@remote.test"])
    assert results["a@remote.test"].kind == DEFERRED
    assert results["a@remote.test"].reply == "451 4.3.0 try again later"
    assert results["x@remote.test"].kind == FAILED
    assert sink.messages == []


def test_refused_sender_fails_everyone(sink):
    sink.script.mail = lambda sender: "553 5.7.1 sender rejected"
    results = send(RelaySender(reactor, settings(sink.port)), [Hop("mx", ("127.0.0.1",))],
                   ["a@remote.test", "b@remote.test"])
    assert {r.reply for r in results.values()} == {"553 5.7.1 sender rejected"}
    assert {r.kind for r in results.values()} == {FAILED}


def test_connection_refused_is_deferred_with_the_address_in_the_reply():
    port = closedPort()
    results = send(RelaySender(reactor, settings(port)), [Hop("mx.remote.test", ("127.0.0.1",))])
    [result] = results.values()
    assert result.kind == DEFERRED and not result.remote
    assert result.reply == f"451 4.4.1 connect to mx.remote.test[127.0.0.1]:{port}: Connection refused"


def test_next_mx_when_the_first_is_down():
    sink = startSink(interfaces=("127.0.0.3",))
    try:
        results = send(RelaySender(reactor, settings(sink.port)),
                       [Hop("mx1", ("127.0.0.2",), 10), Hop("mx2", ("127.0.0.3",), 20)])
        assert results["bob@remote.test"].kind == SENT
        assert results["bob@remote.test"].host == "mx2"
    finally:
        sink.stop()


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 5.7.1 go away"])
def test_next_mx_when_the_first_refuses_to_talk(greeting):
    first = startSink(interfaces=("127.0.0.2",), script=Script(greeting=greeting))
    second = startSink(port=first.port, interfaces=("127.0.0.3",))
    try:
        results = send(RelaySender(reactor, settings(first.port)),
                       [Hop("mx1", ("127.0.0.2",), 10), Hop("mx2", ("127.0.0.3",), 20)])
        assert results["bob@remote.test"].kind == SENT and len(second.messages) == 1
    finally:
        first.stop()
        second.stop()


def test_ipv6_and_ipv4_addresses_are_both_tried():
    port = freePort()
    v4 = startSink(port=port, interfaces=("127.0.0.1",))
    try:
        results = send(RelaySender(reactor, settings(port)), [Hop("mx", ("::1", "127.0.0.1"))])
        assert results["bob@remote.test"].kind == SENT and v4.messages[0].peer == "127.0.0.1"
    finally:
        v4.stop()
    v6 = startSink(port=port, interfaces=("::1",))
    try:
        results = send(RelaySender(reactor, settings(port)), [Hop("mx", ("::1", "127.0.0.1"))])
        assert results["bob@remote.test"].kind == SENT and v6.messages[0].peer == "::1"
    finally:
        v6.stop()


def test_a_stalled_server_times_out_and_the_message_is_not_offered_elsewhere():
    """Once DATA is sent the first host may have the message: no second host this attempt."""
    stalled = startSink(interfaces=("127.0.0.2",), script=Script(hold=defer.Deferred()))
    other = startSink(port=stalled.port, interfaces=("127.0.0.3",))
    try:
        results = send(RelaySender(reactor, settings(stalled.port, commandTimeout=1)),
                       [Hop("mx1", ("127.0.0.2",), 10), Hop("mx2", ("127.0.0.3",), 20)])
        [result] = results.values()
        assert result.kind == DEFERRED and result.status == "4.4.2" and "timeout" in result.reply
        assert len(stalled.dataSeen) == 1 and other.connections == 0
    finally:
        stalled.stop()
        other.stop()


def test_a_tarpit_greeting_times_out():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts, never greets
        results = send(RelaySender(reactor, settings(silent.getsockname()[1], commandTimeout=1)),
                       [Hop("mx", ("127.0.0.1",))])
    [result] = results.values()
    assert result.kind == DEFERRED and "timeout" in result.reply


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs():
    return makeCerts("localhost")


def test_opportunistic_starttls_is_used_when_offered(certs):
    sink = startSink(script=Script(tlsOptions=certs.serverOptions()))
    try:
        results = send(RelaySender(reactor, settings(sink.port)), [Hop("mx", ("127.0.0.1",))])
        assert results["bob@remote.test"].kind == SENT
        assert sink.messages[0].tls  # self-signed for all we know: not verified, still used
    finally:
        sink.stop()


def test_failed_opportunistic_handshake_is_retried_in_plaintext(certs):
    from twisted.internet import ssl

    # The server demands a client certificate we do not have: the handshake fails.
    options = certs.serverOptions(ssl.Certificate.loadPEM(certs.caPEM))
    sink = startSink(script=Script(tlsOptions=options))
    try:
        results = send(RelaySender(reactor, settings(sink.port)), [Hop("mx", ("127.0.0.1",))])
        assert results["bob@remote.test"].kind == SENT
        assert not sink.messages[0].tls and sink.connections == 2
    finally:
        sink.stop()


def smarthostSettings(port, certs, tmp_path, **kw):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.caPEM)
    kw.setdefault("username", "relayuser")
    kw.setdefault("password", "s3cret pass")
    kw.setdefault("tls", "required")
    return settings(port, trustRoot=trustRootFromFile(str(ca)), **kw)


def test_smarthost_with_verified_tls_and_auth(certs, tmp_path):
    sink = startSink(script=Script(tlsOptions=certs.serverOptions(),
                                   users={"relayuser": "s3cret pass"}))
    try:
        results = send(RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path)),
                       [Hop("localhost", ("127.0.0.1",))])
        assert results["bob@remote.test"].kind == SENT
        assert sink.messages[0].tls and sink.messages[0].user == "relayuser"
    finally:
        sink.stop()


def test_required_tls_without_starttls_never_sends_the_password(certs, tmp_path):
    sink = startSink(script=Script(users={"relayuser": "s3cret pass"}, authNeedsTLS=False))
    try:
        results = send(RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path)),
                       [Hop("localhost", ("127.0.0.1",))])
        [result] = results.values()
        assert result.kind == DEFERRED and result.status == "4.7.5"
        assert not [line for who, line in sink.transcript if line.startswith("AUTH")]
        assert sink.messages == []
    finally:
        sink.stop()


def test_required_tls_rejects_a_certificate_we_cannot_verify(certs, tmp_path):
    other = makeCerts("localhost")  # signed by a CA we were not told to trust
    sink = startSink(script=Script(tlsOptions=other.serverOptions(),
                                   users={"relayuser": "s3cret pass"}))
    try:
        results = send(RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path)),
                       [Hop("localhost", ("127.0.0.1",))])
        assert results["bob@remote.test"].kind == DEFERRED
        assert sink.messages == [] and sink.connections == 1  # no plaintext retry
    finally:
        sink.stop()


def test_wrong_password_is_deferred(certs, tmp_path):
    sink = startSink(script=Script(tlsOptions=certs.serverOptions(),
                                   users={"relayuser": "other"}))
    try:
        results = send(RelaySender(reactor, smarthostSettings(sink.port, certs, tmp_path)),
                       [Hop("localhost", ("127.0.0.1",))])
        [result] = results.values()
        assert result.kind == DEFERRED and result.status == "4.7.8"
        assert "s3cret" not in result.reply
    finally:
        sink.stop()


# -- MTA-STS (RFC 8461 §5) --------------------------------------------------------


class Reports:
    """Records what the sender reports for TLS-RPT."""

    def __init__(self):
        self.records = []

    def record(self, domain, policy, failure, host, address):
        self.records.append((domain, failure, host))


def stsSettings(port, certs, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.caPEM)
    return settings(port, trustRoot=trustRootFromFile(str(ca)))


def policy(mode):
    from twistmail.mtasts import Policy
    return Policy(mode, ("localhost",), 86400, "id1")


def test_enforce_without_starttls_is_deferred_and_reported(certs, tmp_path):
    sink = startSink()  # no STARTTLS offered: a downgrade
    reports = Reports()
    try:
        results = send(RelaySender(reactor, stsSettings(sink.port, certs, tmp_path), reports),
                       [Hop("localhost", ("127.0.0.1",), policy=policy("enforce"))])
        [result] = results.values()
        assert result.kind == DEFERRED and result.status == "4.7.5"
        assert "MTA-STS" in result.reply
        assert sink.messages == [] and sink.connections == 1  # no plaintext retry
        assert reports.records == [("remote.test", "starttls-not-supported", "localhost")]
    finally:
        sink.stop()


def test_a_tls_report_is_delivered_despite_the_policy_and_not_counted(certs, tmp_path):
    """RFC 8460 §5.3: reports of TLS failures must get through those failures (they are
    sent as RFC 8689 ``TLS-Required: No``), and are not counted in the next report."""
    sink = startSink()  # no STARTTLS: what the report is about
    reports = Reports()
    try:
        results = send(RelaySender(reactor, stsSettings(sink.port, certs, tmp_path), reports),
                       [Hop("localhost", ("127.0.0.1",), policy=policy("enforce"))],
                       mailFrom="", origin="tlsrpt")
        assert results["bob@remote.test"].kind == SENT
        assert len(sink.messages) == 1 and reports.records == []
    finally:
        sink.stop()


def test_enforce_with_an_unverifiable_certificate_is_deferred(certs, tmp_path):
    other = makeCerts("localhost")  # signed by a CA we do not trust
    sink = startSink(script=Script(tlsOptions=other.serverOptions()))
    reports = Reports()
    try:
        results = send(RelaySender(reactor, stsSettings(sink.port, certs, tmp_path), reports),
                       [Hop("localhost", ("127.0.0.1",), policy=policy("enforce"))])
        [result] = results.values()
        assert result.kind == DEFERRED and "MTA-STS" in result.reply
        assert sink.messages == [] and sink.connections == 1
        assert reports.records == [("remote.test", "validation-failure", "localhost")]
    finally:
        sink.stop()


def test_enforce_with_a_valid_certificate_delivers_over_tls(certs, tmp_path):
    sink = startSink(script=Script(tlsOptions=certs.serverOptions()))
    reports = Reports()
    try:
        results = send(RelaySender(reactor, stsSettings(sink.port, certs, tmp_path), reports),
                       [Hop("localhost", ("127.0.0.1",), policy=policy("enforce"))])
        assert results["bob@remote.test"].kind == SENT
        assert sink.messages[0].tls
        assert reports.records == [("remote.test", None, "localhost")]
    finally:
        sink.stop()


def test_testing_mode_delivers_over_bad_tls_and_reports_the_failure(certs, tmp_path):
    other = makeCerts("localhost")
    sink = startSink(script=Script(tlsOptions=other.serverOptions()))
    reports = Reports()
    try:
        results = send(RelaySender(reactor, stsSettings(sink.port, certs, tmp_path), reports),
                       [Hop("localhost", ("127.0.0.1",), policy=policy("testing"))])
        assert results["bob@remote.test"].kind == SENT
        assert sink.messages[0].tls  # opportunistic, unverified, as without a policy
        assert reports.records == [("remote.test", "validation-failure", "localhost")]
    finally:
        sink.stop()
