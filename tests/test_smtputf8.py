"""SMTPUTF8 (RFC 6531) on the inbound side, over loopback against the real server:
UTF-8 accounts created with the admin CLI, smtplib with SMTPUTF8, hostile paths."""

from __future__ import annotations

import os
import smtplib

import pytest
from hostile import smtpDialog
from support import cli, startServer

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
    copy = messages(dataDir, "josé", "xn--bcher-kva.example")[-1]  # the directory is UTF-8 NFC
    assert copy.endswith(message)  # headers stored as sent
    received = copy[:-len(message)]
    assert b" with UTF8SMTP id " in received  # RFC 6531 §3.7.3
    assert messages(dataDir, "ascii", "xn--bcher-kva.example")
    assert messages(dataDir, *GREEK.split("@"))


def test_single_recipient_received_names_it_in_utf8(utf8server):
    with smtplib.SMTP("127.0.0.1", utf8server.smtpPort) as s:
        s.ehlo("client.example")
        s.sendmail("x@remote.test", ["δοκιμή@παράδειγμα.δοκιμή"], b"Subject: x\r\n\r\nx\r\n",
                   mail_options=["SMTPUTF8"])
    copy = messages(utf8server.dataDir, *GREEK.split("@"))[-1]
    assert "for <δοκιμή@παράδειγμα.δοκιμή>".encode() in copy.split(b"\r\n\r\n")[0]


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
