"""SMTPUTF8 (RFC 6531) on the inbound side, over loopback against the real server:
UTF-8 accounts created with the admin CLI, smtplib with SMTPUTF8, hostile paths."""

from __future__ import annotations

import os
import smtplib

import pytest
from hostile import smtpDialog
from support import (
    cli,
    everyBackend,  # noqa: F401 - the backend fixture: each test on every backend
    startServer,
    storedMessages,
)

from twistmail.auth.accounts import AccountError, validAddress

EHLO = b"EHLO client.example"
#: The canonical name of δοκιμή@παράδειγμα.δοκιμή: NFC local part, A-label domain.
GREEK = "δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp"


@pytest.fixture(scope="module")
def utf8server(tmp_path_factory):
    dataDir = str(tmp_path_factory.mktemp("data"))
    cli("domain", "add", "Bücher.Example", dataDir=dataDir)
    cli("domain", "add", "παράδειγμα.δοκιμή", dataDir=dataDir)
    added = cli("user", "add", "José@bücher.example", dataDir=dataDir, stdin="pw-1234567\n")
    assert "user josé@xn--bcher-kva.example added" in added.stdout
    cli("user", "add", "ascii@bücher.example", dataDir=dataDir, stdin="pw-1234567\n")
    cli("user", "add", "Δοκιμή@παράδειγμα.δοκιμή", dataDir=dataDir, stdin="pw-1234567\n")
    srv = startServer(dataDir)
    yield srv
    srv.stop()


def messages(dataDir: str, local: str, domain: str) -> list[bytes]:
    new = os.path.join(dataDir, "mail", domain, local, "new")
    out = []
    for name in sorted(os.listdir(new)) if os.path.isdir(new) else []:
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


def test_ehlo_advertises_smtputf8(utf8server):
    with smtplib.SMTP("127.0.0.1", utf8server.smtpPort) as s:
        s.ehlo("client.example")
        assert s.has_extn("smtputf8")


def test_utf8_message_is_delivered_to_utf8_accounts_unchanged(utf8server):
    message = ("From: Jürgen <jürgen@例え.テスト>\r\nTo: José <josé@bücher.example>\r\n"
               "Subject: Grüße aus Köln\r\n\r\nHallo José\r\n").encode()
    with smtplib.SMTP("127.0.0.1", utf8server.smtpPort) as s:
        s.ehlo("client.example")
        refused = s.sendmail("jürgen@例え.テスト",
                             ["JOSÉ@BÜCHER.example", "ascii@xn--bcher-kva.example",
                              "δοκιμή@παράδειγμα.δοκιμή"],
                             message, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert refused == {}
    dataDir = utf8server.dataDir
    # The account's directory is its UTF-8 (NFC) local part.
    [copy] = [m for m in messages(dataDir, "josé", "xn--bcher-kva.example") if m.endswith(message)]
    assert copy.endswith(message)  # headers stored as sent
    received = copy[:-len(message)]
    assert b" with UTF8SMTP id " in received  # RFC 6531 §3.7.3
    assert messages(dataDir, "ascii", "xn--bcher-kva.example")
    assert messages(dataDir, *GREEK.split("@"))


def test_single_recipient_received_names_it_in_utf8(utf8server):
    with smtplib.SMTP("127.0.0.1", utf8server.smtpPort) as s:
        s.ehlo("client.example")
        s.sendmail("x@remote.test", ["δοκιμή@παράδειγμα.δοκιμή"],
                   b"Subject: single\r\n\r\nx\r\n", mail_options=["SMTPUTF8"])
    [copy] = [m for m in messages(utf8server.dataDir, *GREEK.split("@"))
              if b"Subject: single\r\n" in m]
    assert "for <δοκιμή@παράδειγμα.δοκιμή>".encode() in copy.split(b"\r\n\r\n")[0]


def test_smtputf8_after_helo_is_refused(utf8server):
    replies = smtpDialog(utf8server.smtpPort, [
        b"HELO client.example", "MAIL FROM:<jürgen@example.test> SMTPUTF8".encode(),
        b"MAIL FROM:<x@remote.test>"])
    assert replies[1].startswith(b"555 5.5.4 "), replies
    assert replies[2].startswith(b"250 "), replies


def test_utf8_address_without_smtputf8_gets_553_5_6_7(utf8server):
    replies = smtpDialog(utf8server.smtpPort, [
        EHLO, "MAIL FROM:<jürgen@example.test>".encode(), b"MAIL FROM:<x@remote.test>",
        "RCPT TO:<josé@bücher.example>".encode(), b"RCPT TO:<ascii@xn--bcher-kva.example>"])
    assert replies[1].startswith(b"553 5.6.7 "), replies
    assert replies[2].startswith(b"250 ")
    assert replies[3].startswith(b"553 5.6.7 "), replies
    assert replies[4].startswith(b"250 "), replies  # an A-label needs no SMTPUTF8


@pytest.mark.parametrize("command, reply", [
    (b"MAIL FROM:<\xff\xfe@example.test> SMTPUTF8", b"553 5.1.7 "),  # not UTF-8
    (b"MAIL FROM:<jos\xc3@example.test> SMTPUTF8", b"553 5.1.7 "),  # truncated sequence
    (b"MAIL FROM:<\xc0\xafx@example.test> SMTPUTF8", b"553 5.1.7 "),  # overlong "/"
    (b"MAIL FROM:<a\xc2\x85b@example.test> SMTPUTF8", b"553 5.1.7 "),  # C1 control (NEL)
    ("MAIL FROM:<x@{}.example> SMTPUTF8".format("ü" * 60).encode(), b"553 5.1.7 "),
    ("MAIL FROM:<pаypal@example.test> SMTPUTF8".encode(), b"553 5.1.7 "),  # Cyrillic а
    ("MAIL FROM:<x@exаmple.test> SMTPUTF8".encode(), b"553 5.1.7 "),
    (b"MAIL FROM:<x@remote.test> SMTPUTF8=yes", b"501 5.5.4 "),
])
def test_hostile_utf8_senders_get_precise_replies(utf8server, command, reply):
    replies = smtpDialog(utf8server.smtpPort, [EHLO, command, b"RCPT TO:<ascii@xn--bcher-kva.example>"])
    assert replies[1].startswith(reply), replies
    assert replies[2].startswith(b"503 "), replies  # no transaction was started


@pytest.mark.parametrize("path, reply", [
    (b"<\xff@xn--bcher-kva.example>", b"553 5.1.3 "),
    ("<josé@{}.example>".format("ü" * 60).encode(), b"553 5.1.3 "),
    ("<josé@bü\u200dcher.example>".encode(), b"553 5.1.3 "),  # IDNA 2008 CONTEXTJ
    ("<jоsé@bücher.example>".encode(), b"553 5.1.3 "),  # Cyrillic о
    ("<nobody@bücher.example>".encode(), b"550 5.1.1 "),
])
def test_hostile_utf8_recipients_get_precise_replies_and_nothing_is_stored(utf8server, path,
                                                                           reply):
    before = messages(utf8server.dataDir, "josé", "xn--bcher-kva.example")
    replies = smtpDialog(utf8server.smtpPort, [
        EHLO, b"MAIL FROM:<x@remote.test> SMTPUTF8", b"RCPT TO:" + path, b"DATA"])
    assert replies[2].startswith(reply), replies
    assert replies[3].startswith(b"503 "), replies
    assert messages(utf8server.dataDir, "josé", "xn--bcher-kva.example") == before


@pytest.mark.parametrize("address", ["../x@bücher.example", "a/b@bücher.example",
                                     ".é@bücher.example", "é\x00@bücher.example",
                                     "é" * 33 + "@bücher.example", "pаypal@bücher.example",
                                     "x@bü\u200dcher.example"])
def test_account_names_stay_safe_directory_names(address):
    with pytest.raises(AccountError):
        validAddress(address)


def test_account_names_are_canonical():
    assert validAddress("JOSE\u0301@Bücher.Example.") == "josé@xn--bcher-kva.example"
    assert validAddress("josé@xn--bcher-kva.example") == "josé@xn--bcher-kva.example"


def test_malformed_utf8_header_is_refused_and_nothing_stored(utf8server):
    """RFC 6532 §3.2: the header fields of an SMTPUTF8 message are UTF-8."""
    before = messages(utf8server.dataDir, "ascii", "xn--bcher-kva.example")
    replies = smtpDialog(utf8server.smtpPort, [
        EHLO, b"MAIL FROM:<x@remote.test> SMTPUTF8", b"RCPT TO:<ascii@xn--bcher-kva.example>",
        b"DATA", b"Subject: caf\xc3\r\n\r\nbody\r\n.", b"NOOP"])
    assert replies[4].startswith(b"554 5.6.0 "), replies
    assert replies[5].startswith(b"250 "), replies  # the session goes on
    assert messages(utf8server.dataDir, "ascii", "xn--bcher-kva.example") == before


def test_utf8_alias_reaches_its_target(utf8server):
    from twistmail.auth.accounts import Accounts

    accounts = Accounts(utf8server.dataDir)
    with accounts.editing():
        assert accounts.addAlias("Büro@Bücher.Example", ["JOSÉ@bücher.example"]) == \
            "büro@xn--bcher-kva.example"
    before = len(messages(utf8server.dataDir, "josé", "xn--bcher-kva.example"))
    utf8server.accounts.reload()
    with smtplib.SMTP("127.0.0.1", utf8server.smtpPort) as s:
        s.ehlo("client.example")
        s.sendmail("x@remote.test", ["büro@bücher.example"], b"Subject: alias\r\n\r\nx\r\n",
                   mail_options=["SMTPUTF8"])
    assert len(messages(utf8server.dataDir, "josé", "xn--bcher-kva.example")) == before + 1


def test_every_backend_stores_mail_for_a_utf8_account(dataDir, backend):
    cli("domain", "add", "bücher.example", dataDir=dataDir)
    cli("user", "add", "josé@bücher.example", dataDir=dataDir, stdin="pw-1234567\n")
    srv = startServer(dataDir, storage={"backend": backend})
    try:
        with smtplib.SMTP("127.0.0.1", srv.smtpPort) as s:
            s.ehlo("client.example")
            s.sendmail("x@remote.test", ["josé@bücher.example"], "Subject: Grüße\r\n\r\nx\r\n".encode(),
                       mail_options=["SMTPUTF8"])
    finally:
        srv.stop()
    [stored] = storedMessages(dataDir, "josé@xn--bcher-kva.example", backend)
    assert "Subject: Grüße".encode() in stored


def test_utf8_user_logs_in_under_either_spelling_and_sends_as_themself(utf8server):
    """The login name is canonicalised like any address, so submission's sender check
    (and the account the session acts for) is the same however the user typed it."""
    import base64

    from test_tls import insecure

    login = base64.b64encode("\0JOSE\u0301@Bücher.Example\0pw-1234567".encode()).decode()
    with smtplib.SMTP_SSL("127.0.0.1", utf8server.ports["submissions"], context=insecure(),
                          timeout=10) as s:
        s.ehlo("laptop.example")
        assert s.docmd("AUTH", "PLAIN " + login)[0] == 235
        s.sendmail("josé@xn--bcher-kva.example", ["ascii@bücher.example"],
                   b"Subject: from jose\r\n\r\nx\r\n", mail_options=["SMTPUTF8"])
    assert any(b"Subject: from jose" in m
               for m in messages(utf8server.dataDir, "ascii", "xn--bcher-kva.example"))
