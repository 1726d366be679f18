"""DSN requests (RFC 3461): MAIL/RCPT parameters, kept in the queue, honoured in our reports."""

# ruff: noqa: F811  (pytest fixtures imported from test_relay_e2e, used as arguments)
from __future__ import annotations

import email
import email.policy
import json
import os
import smtplib

import pytest
from relayenv import dsnRecipients, mailbox, queueIds
from serverproc import waitUntil
from support import addUser, readAll
from test_relay_e2e import net, relay  # noqa: F401  (fixtures)
from test_smtp import connect

from twistmail import dsn
from twistmail.relay.bounce import buildBounce, reportExtra
from twistmail.relay.queue import FAILED, QueueEntry, Recipient

ALICE = "alice@example.test"
MESSAGE = (b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: dsn\r\n"
           b"Message-ID: <dsn-1@example.test>\r\n\r\nThe body of the message.\r\n")


# -- xtext and parameters -----------------------------------------------------------


@pytest.mark.parametrize("text", ["plain", "a+b=c", "sp ace", "caf\u00e9", "~!"])
def test_xtext_round_trip(text):
    decoded = dsn.decodeXtext(dsn.encodeXtext(text).encode(), "ENVID")
    assert decoded.encode("latin-1") == text.encode("utf-8")


@pytest.mark.parametrize("bad", [b"a+2", b"a+zz", b"a+2b", b"a=b", b"a b", b"\xff"])
def test_bad_xtext_is_refused(bad):
    with pytest.raises(dsn.DSNError):
        dsn.decodeXtext(bad, "ENVID")


def test_rcpt_parameters():
    assert dsn.parseRcptParams([(b"NOTIFY", b"never")]) == ([], None)
    assert dsn.parseRcptParams([(b"NOTIFY", b"SUCCESS,DELAY"),
                                (b"ORCPT", b"rfc822;bob+2Bx@remote.test")]) == (
        ["SUCCESS", "DELAY"], "rfc822;bob+x@remote.test")
    for bad in ([(b"NOTIFY", b"NEVER,SUCCESS")], [(b"NOTIFY", b"")], [(b"NOTIFY", b"SOMETIMES")],
                [(b"NOTIFY", b"SUCCESS,SUCCESS")], [(b"ORCPT", b"bob@remote.test")],
                [(b"ORCPT", b"rfc822;")], [(b"ORCPT", b"rfc822;" + b"a" * 500)],
                [(b"NOTIFY", b"SUCCESS"), (b"NOTIFY", b"FAILURE")]):
        with pytest.raises(dsn.DSNError):
            dsn.parseRcptParams(bad)


# -- the SMTP server ------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    b"RET=SOME", b"RET=FULL RET=HDRS", b"ENVID=a+zz", b"ENVID=" + b"x" * 101,
    b"ENVID=", b"ENVID=a+0Ab",
])
def test_bad_mail_dsn_parameters_are_501(server, params):
    sock = connect(server)
    sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.test> " + params + b"\r\n")
    replies = readAll(sock, b"501 ")
    assert b"501 5.5.4 " in replies, replies
    sock.sendall(b"RCPT TO:<alice@example.test>\r\n")  # no transaction was started
    assert readAll(sock, b"\r\n").startswith(b"503")
    sock.close()


@pytest.mark.parametrize("command", [b"MAIL FROM:<x@remote.test> ENVID=", b"RCPT TO:<a@b> ORCPT="])
def test_ten_thousand_bytes_of_dsn_parameter_is_a_line_too_long(server, command):
    sock = connect(server)
    sock.sendall(b"EHLO c\r\n")
    readAll(sock, b"250 ")
    sock.sendall(command + b"x" * 10_000 + b"\r\nNOOP\r\n")
    replies = readAll(sock, b"250 ")
    assert replies.startswith(b"500 5.5.2 Line too long\r\n250 2.0.0"), replies
    sock.close()


@pytest.mark.parametrize("params", [
    b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=MAYBE", b"ORCPT=alice@example.test",
    b"ORCPT=rfc822;a+zz", b"ORCPT=rfc822;a+0D+0AX-Injected:+20y", b"ORCPT=rfc822;" + b"a" * 501,
])
def test_bad_rcpt_dsn_parameters_are_501_and_the_recipient_not_added(server, params):
    sock = connect(server)
    sock.sendall(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test> "
                 + params + b"\r\nDATA\r\n")
    replies = readAll(sock, b"503 ")
    assert b"501 5.5.4 " in replies and b"503 5.5.1" in replies, replies
    sock.close()


def test_good_dsn_parameters_are_accepted(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.ehlo("c")
        assert s.mail("x@remote.test", ["RET=HDRS", "ENVID=QQ314159+2B1"])[0] == 250
        assert s.rcpt("alice@example.test", ["NOTIFY=SUCCESS,FAILURE",
                                             "ORCPT=rfc822;alice@example.test"])[0] == 250
        assert s.data(MESSAGE)[0] == 250


# -- the queue ------------------------------------------------------------------------


def send(port, recipients, mailParams=(), rcptParams=(), message=MESSAGE) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.test")
        assert client.mail(ALICE, list(mailParams))[0] == 250
        for rcpt in recipients:
            assert client.rcpt(rcpt, list(rcptParams))[0] == 250
        code, reply = client.data(message)
        assert code == 250, reply


def test_dsn_request_is_kept_in_the_queue_entry(net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    send(server.smtpPort, ["bob@dead.test"], ["RET=FULL", "ENVID=env+2B42"],
         ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Bob+40Dead@dead.test"])
    [id] = waitUntil(lambda: queueIds(dataDir), 10, "the queued message")
    with open(os.path.join(dataDir, "queue", id + ".json")) as f:
        entry = QueueEntry.fromJSON(f.read().encode(), "test")
    request = dsn.Request.fromJSON(entry.extra["dsn"])
    assert (request.ret, request.envid) == ("FULL", "env+42")
    assert request.notify == {"bob@dead.test": ["SUCCESS", "DELAY"]}
    assert request.orcpt == {"bob@dead.test": "rfc822;Bob@Dead@dead.test"}


def test_failure_report_carries_envid_orcpt_and_the_full_message_when_ret_full(
        net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    send(server.smtpPort, ["someone@nomail.test"], ["RET=FULL", "ENVID=my-envelope-7"],
         ["ORCPT=rfc822;someone@nomail.test"])
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the bounce")
    status = [p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status"]
    envelope = status[0].get_payload()[0]
    assert envelope["Original-Envelope-Id"] == "my-envelope-7"
    [failed] = dsnRecipients(report)
    assert failed["Original-Recipient"] == "rfc822; someone@nomail.test"
    [returned] = [p for p in report.iter_parts() if p.get_content_type() == "message/rfc822"]
    assert b"The body of the message." in returned.as_bytes()


def test_notify_never_sends_no_bounce(net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    send(server.smtpPort, ["someone@nomail.test"], [], ["NOTIFY=NEVER"])
    waitUntil(lambda: not queueIds(dataDir), 15, "the message to leave the queue")
    assert mailbox(dataDir, ALICE) == []
    assert queueIds(dataDir) == []  # and no report queued


# -- the report builder ---------------------------------------------------------------


def test_ret_hdrs_or_unset_returns_headers_only():
    entry = QueueEntry("ID1", ALICE, [Recipient("bob@remote.test", FAILED, last_reply="550 5.1.1 no")],
                       1.0, "smtp", extra={"dsn": dsn.Request(ret="HDRS", envid="e1").toJSON()})
    report = buildBounce(entry, entry.recipients, b"Subject: x\r\n", "mx.example.test", 2.0)
    assert b"text/rfc822-headers" in report and b"message/rfc822" not in report
    assert b"Original-Envelope-Id: e1" in report


def test_ret_full_returns_an_8bit_message_octet_for_octet():
    """An 8BITMIME message without SMTPUTF8 comes back whole in an 8bit message/rfc822
    part (RFC 6152); the stock generator would refuse its octets there."""
    original = ("From: alice@example.test\r\nSubject: caf\u00e9\r\nMIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
                "\r\n\r\nd\u00e9j\u00e0 vu\r\n.\r\n").encode()
    entry = QueueEntry("ID1", ALICE, [Recipient("bob@remote.test", FAILED, last_reply="550 5.1.1 no")],
                       1.0, "smtp", extra={"dsn": dsn.Request(ret="FULL").toJSON(),
                                           "body": "8BITMIME"})
    report = buildBounce(entry, entry.recipients, original.split(b"\r\n\r\n")[0] + b"\r\n",
                         "mx.example.test", 2.0, message=original)
    assert original in report and b"\r\n" in report and b"\n\n" not in report.replace(
        b"\r\n", b"")
    parsed = email.message_from_bytes(report, policy=email.policy.default)
    [returned] = [p for p in parsed.iter_parts() if p.get_content_type() == "message/rfc822"]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert returned.get_content()["Subject"] == "caf\u00e9"
    # Queued as 8BITMIME: the relay says BODY=8BITMIME, or converts for a hop without it.
    assert reportExtra(entry, report) == {"body": "8BITMIME"}
    assert reportExtra(entry, b"Subject: ascii\r\n\r\nonly\r\n") == {}


def test_a_full_report_of_an_8bit_message_reaches_its_sender(net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    message = (MESSAGE.decode() + "d\u00e9j\u00e0 vu\r\n").encode()
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        client.ehlo("client.example.test")
        assert client.mail(ALICE, ["RET=FULL", "BODY=8BITMIME"])[0] == 250
        assert client.rcpt("someone@nomail.test")[0] == 250
        assert client.data(message)[0] == 250
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the bounce")
    [returned] = [p for p in report.iter_parts() if p.get_content_type() == "message/rfc822"]
    assert "d\u00e9j\u00e0 vu".encode() in returned.as_bytes()


def reportOf(message) -> tuple[dict, list[dict]]:
    """(per-message fields, per-recipient blocks) of a DSN."""
    [status] = [p for p in message.iter_parts() if p.get_content_type() == "message/delivery-status"]
    return dict(status.get_payload()[0].items()), dsnRecipients(message)


def test_success_asked_for_a_relayed_recipient_gets_a_relayed_report(net, relay, dataDir):
    # RFC 3461 §4.1: the next hop was not asked to report, so we say "relayed".
    server = relay(retry_min=3600, retry_max=3600)
    send(server.smtpPort, ["bob@remote.test", "carol@remote.test"], ["ENVID=e-42"],
         ["NOTIFY=SUCCESS"])
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the success report")
    envelope, blocks = reportOf(report)
    assert envelope["Original-Envelope-Id"] == "e-42"
    assert sorted(b["Final-Recipient"] for b in blocks) == [
        "rfc822; bob@remote.test", "rfc822; carol@remote.test"]
    assert {b["Action"] for b in blocks} == {"relayed"} and {b["Status"][:2] for b in blocks} == {"2."}
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert len(net.sink.messages) == 1


def test_success_not_asked_sends_no_report(net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    send(server.smtpPort, ["bob@remote.test"], [], ["NOTIFY=FAILURE,DELAY"])
    waitUntil(lambda: net.sink.messages, 15, "the delivery")
    waitUntil(lambda: not queueIds(dataDir), 15, "the queue to empty")
    assert mailbox(dataDir, ALICE) == []


def test_success_asked_for_a_local_recipient_gets_a_delivered_report(net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    addUser(dataDir, "bob@example.test")
    send(server.smtpPort, ["bob@example.test"], ["ENVID=local-1"],
         ["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob@Example.TEST"])
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "the success report")
    envelope, [block] = reportOf(report)
    assert envelope["Original-Envelope-Id"] == "local-1"
    assert block["Action"] == "delivered" and block["Status"] == "2.0.0"
    assert block["Original-Recipient"] == "rfc822; Bob@Example.TEST"
    assert len(mailbox(dataDir, "bob@example.test")) == 1


def attempts(dataDir: str, address: str) -> int:
    """Delivery attempts so far of the queued message to C{address} (the reports we
    queue to the sender are in the queue too, for a moment)."""
    for id in queueIds(dataDir):
        with open(os.path.join(dataDir, "queue", id + ".json")) as f:
            recipients = json.load(f)["recipients"]
        if recipients[0]["address"] == address:
            return recipients[0]["attempts"]
    return 0


def test_delay_report_once_after_delay_warning_time(net, relay, dataDir):
    server = relay(retry_min=1, retry_max=1, delay_warning_time=1)
    send(server.smtpPort, ["bob@dead.test"], ["ENVID=slow"], [])  # default NOTIFY includes DELAY
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 20, "the delay report")
    envelope, [block] = reportOf(report)
    assert block["Action"] == "delayed" and block["Status"].startswith("4.")
    assert envelope["Original-Envelope-Id"] == "slow"
    waitUntil(lambda: attempts(dataDir, "bob@dead.test") >= 4, 20, "more attempts")
    assert len(mailbox(dataDir, ALICE)) == 1  # once, not after every attempt


def test_no_delay_report_when_notify_leaves_delay_out(net, relay, dataDir):
    server = relay(retry_min=1, retry_max=1, delay_warning_time=1)
    send(server.smtpPort, ["bob@dead.test"], [], ["NOTIFY=FAILURE"])
    waitUntil(lambda: attempts(dataDir, "bob@dead.test") >= 3, 20, "several attempts")
    assert mailbox(dataDir, ALICE) == []
