"""SMTPUTF8 (RFC 6531) with Debian's Postfix (``smtputf8_enable = yes``), started by
the test: Postfix receives our UTF-8 message, and relays a UTF-8 message to us."""

# ruff: noqa: F811  (pytest fixtures imported from test_relay_e2e, used as arguments)
from __future__ import annotations

import email
import email.policy
import os
import smtplib

from postfixproc import Postfix
from relayenv import queueIds
from serverproc import waitUntil
from support import addUser, cli, freePort, startServer
from test_relay_e2e import ALICE, net  # noqa: F401  (a fixture)

UTF8 = "smtputf8_enable = yes\n"
MESSAGE = ("From: Alice <alice@example.test>\r\nTo: José <josé@remote.test>\r\n"
           "Subject: Grüße aus Köln\r\n\r\nHallo José, café.\r\n").encode()


def test_postfix_receives_our_utf8_message(net, dataDir):
    addUser(dataDir, ALICE)
    postfix = Postfix(freePort(), domains=["remote.test"], extra=UTF8).start()
    server = startServer(dataDir, relay=net.relayConfig(
        smarthost=f"smarthost.test:{postfix.port}", smarthost_tls="opportunistic"))
    try:
        with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
            client.ehlo("client.example.test")
            assert client.sendmail(ALICE, ["josé@remote.test"], MESSAGE,
                                   mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
        waitUntil(lambda: postfix.delivered() == 1, 30, "Postfix to store the message")
        [stored] = postfix.messages()
        for line in MESSAGE.split(b"\r\n"):  # the UTF-8 header fields unchanged (raw UTF-8)
            assert line in stored.split(b"\n"), line
        assert "Delivered-To: josé@remote.test".encode() in stored  # the UTF-8 recipient
        # postlogd writes the log after the delivery: waited for, not assumed.
        waitUntil(lambda: any("status=sent" in line for line in postfix.logLines()), 15,
                  "Postfix to log the delivery")
        waitUntil(lambda: not queueIds(dataDir), 15, "our queue to empty")
    finally:
        server.stop()
        postfix.stop()


def test_postfix_relays_a_utf8_message_to_us(dataDir):
    cli("domain", "add", "bücher.example", dataDir=dataDir)
    cli("user", "add", "josé@bücher.example", dataDir=dataDir, stdin="pw-1234567\n")
    server = startServer(dataDir)
    postfix = Postfix(freePort(), relayhost=f"[127.0.0.1]:{server.smtpPort}", extra=UTF8).start()
    try:
        # smtputf8_autodetect_classes includes sendmail: Postfix flags it SMTPUTF8 itself.
        postfix.run("/usr/sbin/sendmail", "-f", "jürgen@postfix.test", "josé@bücher.example",
                    input="From: jürgen@postfix.test\nSubject: Grüße\n\nHallo\n".encode())
        new = os.path.join(dataDir, "mail", "xn--bcher-kva.example", "josé", "new")
        [name] = waitUntil(lambda: os.path.isdir(new) and os.listdir(new), 30,
                           "the message from Postfix")
        with open(os.path.join(new, name), "rb") as f:
            stored = f.read()
        assert b" with UTF8SMTP id " in stored  # Postfix sent MAIL ... SMTPUTF8
        message = email.message_from_bytes(stored, policy=email.policy.default)
        assert message["Subject"] == "Grüße"
        assert "Subject: Grüße".encode() in stored  # raw UTF-8, as Postfix sent it
    finally:
        postfix.stop()
        server.stop()
