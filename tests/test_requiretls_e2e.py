"""REQUIRETLS (RFC 8689) end to end: the server makeService builds offers it only under
TLS, on the MX port and on submission, keeps it in the queue across a restart, and
its relay delivers such a message only to a verified MX that an MTA-STS policy in
enforce mode lists and that offers REQUIRETLS, or returns it (headers only).

The little Internet is test_mtasts_relay's: sts.test has an enforce policy naming
mx.sts.test (the sink, 127.0.0.1); remote.test has no policy.
"""

from __future__ import annotations

import smtplib

import pytest
from relayenv import dsnRecipients, mailbox, queueIds
from serverproc import waitUntil
from support import addUser, startServer
from test_mtasts_relay import lastReply, net  # noqa: F401 - net is a fixture
from test_relay_e2e import ALICE, relay  # noqa: F401 - relay is a fixture
from test_requiretls import mailLines
from test_tls import insecure

MESSAGE = (b"From: alice@example.test\r\nTo: bob@sts.test\r\nSubject: secret\r\n"
           b"Message-ID: <requiretls-1@example.test>\r\n\r\nThe body nobody may read.\r\n")


def submitRequired(port: int, recipients, message=MESSAGE, options=("REQUIRETLS",)) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=insecure())
        client.sendmail(ALICE, recipients, message, mail_options=list(options))


def test_offered_only_under_tls_and_refused_in_clear_text(net, relay):  # noqa: F811
    server = relay()
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        client.ehlo("client.example.test")
        assert client.has_extn("starttls") and not client.has_extn("requiretls")
        code, reply = client.mail(ALICE, ["REQUIRETLS"])
        assert (code, reply[:6]) == (530, b"5.7.10"), reply
        client.starttls(context=insecure())
        client.ehlo("client.example.test")
        assert client.has_extn("requiretls")
        assert client.mail(ALICE, ["REQUIRETLS=YES"])[0] == 555  # it takes no value
        assert client.mail(ALICE, ["REQUIRETLS", "REQUIRETLS"])[0] == 501
        assert client.mail(ALICE, ["REQUIRETLS"])[0] == 250
    assert net.sink.connections == 0


def test_submission_offers_it_after_starttls(net, dataDir):  # noqa: F811
    net.sink.script.tlsOptions = net.mxCerts.serverOptions()
    net.sink.script.tlsExtensions = ("REQUIRETLS",)
    addUser(dataDir, ALICE)
    server = startServer(dataDir, relay=net.relayConfig())
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
            client.ehlo()
            assert not client.has_extn("requiretls")
            client.starttls(context=insecure())
            client.ehlo()
            assert client.has_extn("requiretls")
            client.login(ALICE, "secret")
            client.sendmail(ALICE, ["bob@sts.test"], MESSAGE, mail_options=["REQUIRETLS"])
        waitUntil(lambda: net.sink.messages, 15, "delivery over verified TLS")
        assert mailLines(net.sink) == ["MAIL FROM:<alice@example.test> REQUIRETLS"]
    finally:
        server.stop()


def test_relayed_over_verified_tls_with_the_parameter(net, relay, dataDir):  # noqa: F811
    net.sink.script.tlsOptions = net.mxCerts.serverOptions()
    net.sink.script.tlsExtensions = ("REQUIRETLS",)
    server = relay()
    submitRequired(server.smtpPort, ["bob@sts.test"])
    [got] = waitUntil(lambda: net.sink.messages, 15, "delivery over verified TLS")
    assert got.tls and got.data.endswith(b"The body nobody may read.\r\n")
    assert mailLines(net.sink) == ["MAIL FROM:<alice@example.test> REQUIRETLS"]
    waitUntil(lambda: not queueIds(dataDir), 15, "the queue to empty")


def test_returned_with_5_7_10_and_headers_only_when_the_mx_has_no_starttls(net, relay, dataDir):  # noqa: F811
    server = relay()  # the sink offers no STARTTLS
    submitRequired(server.smtpPort, ["bob@sts.test"], options=("REQUIRETLS", "RET=FULL"))
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the non-delivery report")
    [block] = dsnRecipients(report)
    assert block["Action"] == "failed" and block["Status"] == "5.7.10", block
    assert "REQUIRETLS" in block["Diagnostic-Code"]
    # RFC 8689 §5: as if RET=HDRS, whatever the sender asked.
    assert [p.get_content_type() for p in report.iter_parts()][-1] == "text/rfc822-headers"
    assert b"The body nobody may read" not in report.as_bytes()
    assert net.sink.dataSeen == [] and mailLines(net.sink) == []  # nothing in clear text
    waitUntil(lambda: not queueIds(dataDir), 15, "the queue to empty")


def test_returned_when_the_certificate_cannot_be_verified(net, relay, dataDir):  # noqa: F811
    from certs import makeCerts

    net.sink.script.tlsOptions = makeCerts("mx.sts.test").serverOptions()  # untrusted CA
    net.sink.script.tlsExtensions = ("REQUIRETLS",)
    server = relay()
    submitRequired(server.smtpPort, ["bob@sts.test"])
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the non-delivery report")
    assert dsnRecipients(report)[0]["Status"] == "5.7.10"
    assert net.sink.dataSeen == []


def test_a_domain_without_mta_sts_is_never_tried(net, relay, dataDir):  # noqa: F811
    """We do not validate DNSSEC: remote.test's MX answer alone vouches for nothing."""
    net.sink.script.tlsOptions = net.mxCerts.serverOptions()
    net.sink.script.tlsExtensions = ("REQUIRETLS",)
    server = relay()
    submitRequired(server.smtpPort, ["bob@remote.test"])
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the non-delivery report")
    [block] = dsnRecipients(report)
    assert block["Status"] == "5.7.10" and "MTA-STS" in block["Diagnostic-Code"]
    assert net.sink.connections == 0


def test_the_flag_survives_a_restart(net, dataDir):  # noqa: F811
    net.sink.script.tlsOptions = net.mxCerts.serverOptions()
    net.sink.script.tlsExtensions = ("REQUIRETLS",)
    net.sink.script.mail = lambda sender: "451 4.3.0 not now"
    addUser(dataDir, ALICE)
    server = startServer(dataDir, relay=net.relayConfig())
    try:
        submitRequired(server.smtpPort, ["bob@sts.test"])
        [queueId] = queueIds(dataDir)
        waitUntil(lambda: lastReply(dataDir, queueId).startswith("451 4.3.0"), 15, "a deferral")
    finally:
        server.stop()
    net.sink.script.mail = lambda sender: None
    del net.sink.transcript[:]
    server = startServer(dataDir, relay=net.relayConfig())
    try:
        waitUntil(lambda: net.sink.messages, 15, "delivery after the restart")
        assert mailLines(net.sink) == ["MAIL FROM:<alice@example.test> REQUIRETLS"]
    finally:
        server.stop()


@pytest.mark.parametrize("requireTLS", [False, True])
def test_tls_required_no_overrides_mta_sts_unless_requiretls_was_given(net, relay, dataDir,  # noqa: F811
                                                                         requireTLS):
    """RFC 8689 §4.1: the MAIL parameter wins over the header field."""
    server = relay()  # the sink offers no STARTTLS: enforce alone would hold it back
    message = b"TLS-Required: No\r\n" + MESSAGE
    if requireTLS:
        submitRequired(server.smtpPort, ["bob@sts.test"], message)
        [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the non-delivery report")
        assert dsnRecipients(report)[0]["Status"] == "5.7.10"
        assert net.sink.dataSeen == []
    else:
        submitRequired(server.smtpPort, ["bob@sts.test"], message, options=())
        [got] = waitUntil(lambda: net.sink.messages, 15, "delivery despite the policy")
        assert not got.tls and mailLines(net.sink) == ["MAIL FROM:<alice@example.test>"]
