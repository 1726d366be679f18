"""DSN (RFC 3461) and 8-bit mail with Debian's Postfix, started by the test.

twistmail relays through Postfix (its smarthost) and Postfix relays everything
that is not its own back to twistmail: so Postfix receives our NOTIFY, ORCPT,
ENVID and RET, and its success report for them travels back as mail from
Postfix into twistmail, where the sender's mailbox shows what arrived.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_relay_e2e, used as arguments)
from __future__ import annotations

import email
import email.policy
import smtplib

import pytest
from postfixproc import Postfix
from relayenv import dsnRecipients, mailbox, queueIds
from serverproc import waitUntil
from support import addUser, freePort, startServer
from test_relay_e2e import ALICE, net  # noqa: F401  (a fixture)


@pytest.fixture
def chain(net, dataDir):
    """(twistmail, Postfix): each other's relay."""
    addUser(dataDir, ALICE)
    port = freePort()
    server = startServer(dataDir, relay=net.relayConfig(
        smarthost=f"smarthost.test:{port}", smarthost_tls="opportunistic"))
    postfix = Postfix(port, domains=["remote.test"],
                      relayhost=f"[127.0.0.1]:{server.smtpPort}").start()
    yield server, postfix
    postfix.stop()
    server.stop()


def test_dsn_parameters_reach_postfix_and_its_success_report_comes_back(chain, dataDir):
    server, postfix = chain
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        client.ehlo("client.example.test")
        assert client.mail(ALICE, ["RET=HDRS", "ENVID=pf-env+2B1"])[0] == 250
        assert client.rcpt("bob@remote.test", ["NOTIFY=SUCCESS",
                                               "ORCPT=rfc822;Robert@remote.test"])[0] == 250
        assert client.data(f"From: {ALICE}\r\nSubject: dsn interop\r\n\r\nhi\r\n".encode())[0] == 250
    waitUntil(lambda: postfix.delivered() == 1, 30, "Postfix to store the message")
    # Postfix's report, not ours ("relayed"): the hop was asked to report, so we did not.
    [report] = waitUntil(lambda: mailbox(dataDir, ALICE), 30, "Postfix's success report")
    assert "postfix.test" in report["From"]
    text = report.as_string()
    assert "Original-Envelope-Id: pf-env+1" in text  # xtext decoded
    [block] = dsnRecipients(report)
    assert block["Action"] == "delivered"
    assert block["Original-Recipient"].replace(" ", "") == "rfc822;Robert@remote.test"
    assert block["Final-Recipient"] == "rfc822; bob@remote.test"
    waitUntil(lambda: not queueIds(dataDir), 15, "twistmail's queue to empty")
    assert len(mailbox(dataDir, ALICE)) == 1


def test_postfix_as_sender_passes_dsn_and_gets_our_delivered_report(chain, dataDir):
    server, postfix = chain
    # Postfix's smtp client sends NOTIFY and ENVID to a server that offers DSN.
    postfix.run("/usr/sbin/sendmail", "-f", "bob@remote.test", "-N", "success",
                "-V", "from-postfix-9", ALICE,
                input=b"From: bob@remote.test\nSubject: to twistmail\n\nhello\n")
    waitUntil(lambda: mailbox(dataDir, ALICE), 30, "the message from Postfix")
    # Our "delivered" report goes to bob@remote.test, i.e. back through Postfix.
    waitUntil(lambda: postfix.delivered() == 1, 30, "our report to reach Postfix's mailbox")
    report = email.message_from_bytes(postfix.messages()[0], policy=email.policy.default)
    assert "MAILER-DAEMON@mx.example.test" in report["From"]
    assert "Original-Envelope-Id: from-postfix-9" in report.as_string()
    [block] = dsnRecipients(report)
    assert block["Action"] == "delivered" and block["Final-Recipient"] == f"rfc822; {ALICE}"


EIGHT_BIT = ("From: alice@example.test\r\nSubject: 8-bit\r\nMIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             "Gr\u00fc\u00dfe aus K\u00f6ln, caf\u00e9.\r\n").encode()


def viaPostfix(net, dataDir, body: str, extra: str = "") -> bytes:
    """Relay EIGHT_BIT (with BODY=body) through a Postfix with C{extra} main.cf lines;
    the message as Postfix stored it."""
    addUser(dataDir, ALICE)
    postfix = Postfix(freePort(), domains=["remote.test"], extra=extra).start()
    server = startServer(dataDir, relay=net.relayConfig(
        smarthost=f"smarthost.test:{postfix.port}", smarthost_tls="opportunistic"))
    try:
        send8bit(server, body)
        waitUntil(lambda: postfix.delivered() == 1, 30, "Postfix to store the message")
        [stored] = postfix.messages()
        return stored
    finally:
        server.stop()
        postfix.stop()


def send8bit(server, body: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        client.ehlo("c")
        assert client.mail(ALICE, [f"BODY={body}"])[0] == 250
        assert client.rcpt("bob@remote.test")[0] == 250
        if body == "BINARYMIME":
            client.putcmd("BDAT", f"{len(EIGHT_BIT)} LAST")  # RFC 3030: no reply before the octets
            client.send(EIGHT_BIT)
            assert client.getreply()[0] == 250
        else:
            assert client.data(EIGHT_BIT)[0] == 250


@pytest.mark.parametrize("body", ["8BITMIME", "BINARYMIME"])
def test_8bit_message_reaches_postfix_unchanged_when_it_offers_8bitmime(net, dataDir, body):
    stored = viaPostfix(net, dataDir, body)
    assert "Gr\u00fc\u00dfe".encode() in stored
    assert "Content-Transfer-Encoding: 8bit" in stored.decode("utf-8")


@pytest.mark.parametrize("body", ["8BITMIME", "BINARYMIME"])
def test_8bit_message_is_converted_for_postfix_without_8bitmime(net, dataDir, body):
    # RFC 6152 §3: to a server that does not offer 8BITMIME, convert to 7 bit.
    stored = viaPostfix(net, dataDir, body, "smtpd_discard_ehlo_keywords = 8bitmime\n")
    assert stored.isascii(), stored
    message = email.message_from_bytes(stored, policy=email.policy.default)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content() == "Gr\u00fc\u00dfe aus K\u00f6ln, caf\u00e9.\n"
    assert message["Subject"] == "8-bit"
