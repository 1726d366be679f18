"""Relaying SMTPUTF8 mail (RFC 6531 §3.2, RFC 6533), end to end: the real server,
a DNS server and a receiving SMTP server on loopback, and ``twistmail sendmail``.

The receiving server offers SMTPUTF8 or not; a message that needs it is bounced
(5.6.7, ``message/global-delivery-status``) to a hop without it, and downgraded
only when its addresses have ASCII local parts and its headers are ASCII."""

# ruff: noqa: F811  (pytest fixtures imported from test_relay_e2e, used as arguments)
from __future__ import annotations

import email
import email.policy
import json
import os
import smtplib

import pytest
from relayenv import mailbox, queueIds
from serverproc import waitUntil
from support import cli, maildirFiles
from test_relay_e2e import ALICE, net, relay  # noqa: F401  (fixtures)

from twistmail.cli.sendmail import needsSMTPUTF8

UTF8_MESSAGE = ("From: Alice <alice@example.test>\r\nTo: José <josé@bücher.test>\r\n"
                "Subject: Grüße aus Köln\r\nMessage-ID: <utf8-1@example.test>\r\n\r\n"
                "Hallo José\r\n").encode()
ASCII_MESSAGE = (b"From: alice@example.test\r\nTo: bob@xn--bcher-kva.test\r\nSubject: plain\r\n"
                 b"Message-ID: <ascii-1@example.test>\r\n\r\nHello\r\n")


@pytest.fixture
def server(relay):
    return relay(retry_min=3600, retry_max=3600)


def submit(port: int, recipients: list[str], message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.test")
        assert client.sendmail(ALICE, recipients, message,
                               mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}


def mailCommands(net) -> list[str]:
    return [line for who, line in net.sink.transcript if who == "C" and line.startswith("MAIL")]


def test_relayed_with_smtputf8_to_a_hop_that_offers_it(net, server, dataDir):
    net.sink.script.extensions = ["SMTPUTF8"]
    submit(server.smtpPort, ["José@Bücher.test"], UTF8_MESSAGE)
    [got] = waitUntil(lambda: net.sink.messages, 15, "delivery to the SMTPUTF8 hop")
    # The local part as given (NFC), the domain as its A-label (RFC 6531 §3.2 allows it).
    assert got.sender == ALICE and got.recipients == ["José@xn--bcher-kva.test"]
    assert mailCommands(net) == [f"MAIL FROM:<{ALICE}> BODY=8BITMIME SMTPUTF8"]
    assert got.data.endswith(UTF8_MESSAGE)  # the UTF-8 header fields unchanged
    assert b" with UTF8SMTP id " in got.data.split(b"\r\n\r\n")[0]
    waitUntil(lambda: not queueIds(dataDir), 10, "the queue to empty")


def test_queue_keeps_the_smtputf8_flag(net, server, dataDir):
    net.sink.script.rcpt = lambda rcpt: "451 4.3.0 later"
    submit(server.smtpPort, ["josé@bücher.test"], UTF8_MESSAGE)
    [queueId] = waitUntil(lambda: queueIds(dataDir), 10, "the message in the queue")
    with open(os.path.join(dataDir, "queue", queueId + ".json")) as f:
        entry = json.load(f)
    assert entry["extra"]["smtputf8"] is True
    assert [r["address"] for r in entry["recipients"]] == ["josé@xn--bcher-kva.test"]


def bounce(dataDir):
    """The bounce in alice's INBOX: (its status part, its returned headers), as octets."""
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the bounce")
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "global-delivery-status"  # RFC 6533 §6.1
    [name] = maildirFiles(dataDir, ALICE)
    with open(os.path.join(dataDir, "mail", "example.test", "alice", "new", name), "rb") as f:
        raw = f.read()
    status = raw.split(b"Content-Type: message/global-delivery-status\r\n")[1].split(b"\r\n--")[0]
    headers = raw.split(b"Content-Type: message/global-headers\r\n")[1].split(b"\r\n--")[0]
    return status.decode("utf-8"), headers


def test_bounced_with_5_6_7_by_a_hop_without_smtputf8(net, server, dataDir):
    submit(server.smtpPort, ["josé@bücher.test"], UTF8_MESSAGE)
    status, headers = bounce(dataDir)
    assert "Final-Recipient: utf-8; josé@xn--bcher-kva.test" in status  # RFC 6533 §3
    assert "Status: 5.6.7" in status
    assert "SMTPUTF8 is required, but was not offered by host mx.remote.test" in status
    assert "Subject: Grüße aus Köln".encode() in headers  # as the sender wrote them
    assert net.sink.messages == [] and mailCommands(net) == []  # no MAIL was sent
    waitUntil(lambda: not queueIds(dataDir), 10, "the queue to empty")


def test_utf8_headers_are_bounced_though_the_envelope_is_ascii(net, server, dataDir):
    submit(server.smtpPort, ["bob@bücher.test"], UTF8_MESSAGE)
    status, _ = bounce(dataDir)
    assert "Final-Recipient: rfc822; bob@xn--bcher-kva.test" in status
    assert "Status: 5.6.7" in status and "UTF-8 header fields" in status
    assert net.sink.messages == []


def test_ascii_message_is_downgraded_to_a_hop_without_smtputf8(net, server, dataDir):
    """As Postfix: nothing in it needs SMTPUTF8, so it goes without the parameter."""
    submit(server.smtpPort, ["bob@bücher.test"], ASCII_MESSAGE)
    [got] = waitUntil(lambda: net.sink.messages, 15, "the downgraded delivery")
    assert got.recipients == ["bob@xn--bcher-kva.test"]
    assert mailCommands(net) == [f"MAIL FROM:<{ALICE}> BODY=8BITMIME"]
    assert got.data.endswith(ASCII_MESSAGE)
    waitUntil(lambda: not queueIds(dataDir), 10, "the queue to empty")
    assert mailbox(dataDir, ALICE) == []


def test_sendmail_flags_utf8_messages(net, server, dataDir):
    net.sink.script.extensions = ["SMTPUTF8"]
    cli("sendmail", "-f", ALICE, "josé@bücher.test", dataDir=dataDir,
        stdin="Subject: Grüße\n\nHallo\n")
    [got] = waitUntil(lambda: net.sink.messages, 15, "delivery of the sendmail message")
    assert mailCommands(net) == [f"MAIL FROM:<{ALICE}> SMTPUTF8"]
    message = email.message_from_bytes(got.data, policy=email.policy.default)
    assert message["Subject"] == "Grüße"


def test_needs_smtputf8():
    assert not needsSMTPUTF8(b"Subject: x\n\n\xc3\xbc body only\n", ALICE, ["b@x.test"])
    assert needsSMTPUTF8("Subject: ü\n\nx\n".encode(), ALICE, ["b@x.test"])
    assert needsSMTPUTF8(b"Subject: x\n\nx\n", ALICE, ["jos\u00e9@x.test"])
    assert needsSMTPUTF8(b"Subject: x\n\nx\n", "j\u00fcrgen@x.test", ["b@x.test"])


def test_bounce_to_a_utf8_sender_is_relayed_with_smtputf8(net, server, dataDir):
    """The report is queued with SMTPUTF8 itself and found by the sender's A-label domain."""
    net.sink.script.extensions = ["SMTPUTF8"]
    net.sink.script.rcpt = lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("nobody") \
        else None
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        client.ehlo("client.example.test")
        assert client.sendmail("jürgen@bücher.test", ["nobody@remote.test"], UTF8_MESSAGE,
                               mail_options=["SMTPUTF8"]) == {}
    [report] = waitUntil(lambda: net.sink.messages, 15, "the bounce to jürgen")
    assert report.sender == "" and report.recipients == ["jürgen@bücher.test"]  # as given
    # 8-bit content: declared (RFC 6531 §3.1 needs 8BITMIME of a server offering SMTPUTF8).
    assert mailCommands(net)[-1] == "MAIL FROM:<> BODY=8BITMIME SMTPUTF8"
    assert b"Content-Type: message/global-delivery-status" in report.data
    assert "To: <jürgen@bücher.test>".encode() in report.data  # RFC 6532: UTF-8 as it is
