"""TLS on every protocol, submission with AUTH, and no passwords in the clear.

Servers here use the self-signed certificate generated on first start; the
clients do not verify it (that is the point of a real certificate, tested
in test_interop_tls with curl and openssl against a configured one).
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import smtplib
import socket
import ssl

import pytest
from support import addUser, readAll, startServer

ALICE = "alice@example.test"


def insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def strict(dataDir):
    """A server where clients are remote: they connect from 127.0.0.1 to listeners on
    127.0.0.2, so no password is accepted without TLS."""
    addUser(dataDir, ALICE)
    addUser(dataDir, "bob@example.test")
    from twistmail.auth.accounts import Accounts

    accounts = Accounts(dataDir)
    with accounts.editing():
        accounts.addAlias("sales@example.test", [ALICE])
    srv = startServer(dataDir, host="127.0.0.2")
    yield srv
    srv.stop()


def stored(dataDir: str, address: str) -> list[bytes]:
    local, domain = address.split("@")
    out = []
    for sub in ("new", "cur"):
        path = os.path.join(dataDir, "mail", domain, local, sub)
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            with open(os.path.join(path, name), "rb") as f:
                out.append(f.read())
    return out


def test_self_signed_certificate_generated_for_the_host_name(strict):
    path = os.path.join(strict.dataDir, "tls", "selfsigned.crt")
    assert os.path.exists(path)
    assert os.stat(os.path.join(strict.dataDir, "tls", "selfsigned.key")).st_mode & 0o077 == 0
    with socket.create_connection((strict.host, strict.ports["imaps"]), timeout=10) as raw:
        with insecure().wrap_socket(raw, server_hostname="mx.example.test") as tls:
            der = tls.getpeercert(binary_form=True)
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    assert cert.subject.rfc4514_string() == "CN=mx.example.test"


# -- SMTP: MX and submission ------------------------------------------------------------


def test_mx_offers_starttls_but_not_auth(strict):
    with smtplib.SMTP(strict.host, strict.smtpPort, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=insecure())
        client.ehlo()
        assert not client.has_extn("starttls") and not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN")[0] == 502
        client.sendmail("x@remote.test", [ALICE], b"Subject: over tls\r\n\r\nhi\r\n")
    [data] = stored(strict.dataDir, ALICE)
    assert data.endswith(b"Subject: over tls\r\n\r\nhi\r\n")


def test_submission_needs_tls_then_auth(strict):
    port = strict.ports["submission"]
    with smtplib.SMTP(strict.host, port, timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("auth"), "no AUTH offered before TLS"
        assert client.docmd("AUTH", "PLAIN " + base64.b64encode(
            b"\0alice@example.test\0secret").decode())[0] == 538
        code, reply = client.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530, reply
        client.starttls(context=insecure())
        client.ehlo()
        assert client.has_extn("auth") and "PLAIN" in client.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            client.login(ALICE, "wrong")
        assert caught.value.smtp_code == 535
        client.login(ALICE, "secret")
        client.sendmail(ALICE, ["bob@example.test"], b"Subject: submitted\r\n\r\nbody\r\n")
    [data] = stored(strict.dataDir, "bob@example.test")
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data  # RFC 6409 §8
    assert data.endswith(b"Subject: submitted\r\n\r\nbody\r\n")


def test_submissions_implicit_tls_auth_login_and_relay_to_the_queue(strict):
    with smtplib.SMTP_SSL(strict.host, strict.ports["submissions"], context=insecure(),
                          timeout=10) as client:
        client.ehlo()
        assert "LOGIN" in client.esmtp_features["auth"]
        client.user, client.password = ALICE, "secret"
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        message = (b"Subject: outward\r\nMessage-ID: <keep@example.test>\r\n"
                   b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nto the world\r\n")
        refused = client.sendmail(ALICE, ["someone@remote.example"], message)
        assert refused == {}
    queue = os.path.join(strict.dataDir, "queue")
    queued = [name for name in os.listdir(queue) if name.endswith(".eml")]
    assert len(queued) == 1, "an authenticated user may send to any domain"
    with open(os.path.join(queue, queued[0]), "rb") as f:
        data = f.read()
    assert data.count(b"Message-ID:") == 1 and data.count(b"Date:") == 1


@pytest.mark.parametrize("sender, ok", [
    ("alice@example.test", True), ("ALICE@example.test", True), ("alice+news@example.test", True),
    ("sales@example.test", True), ("bob@example.test", False), ("alice@remote.example", False),
    ("", False),
])
def test_submission_sender_must_be_the_users_own(strict, sender, ok):
    with smtplib.SMTP_SSL(strict.host, strict.ports["submissions"], context=insecure(),
                          timeout=10) as client:
        client.login(ALICE, "secret")
        code, reply = client.mail(sender)
        if ok:
            assert code == 250, reply
        else:
            assert (code, reply[:5]) == (553, b"5.7.1"), reply


def test_auth_before_tls_is_allowed_from_the_listeners_own_address(dataDir):
    addUser(dataDir, ALICE)
    srv = startServer(dataDir)  # 127.0.0.1 -> 127.0.0.1: this host, may send passwords in clear
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as client:
            client.ehlo()
            assert client.has_extn("auth")
            client.login(ALICE, "secret")
    finally:
        srv.stop()


def test_mx_auth_relay_when_configured(dataDir):
    addUser(dataDir, ALICE)
    srv = startServer(dataDir, smtp={"auth": True}, auth={"plaintext_networks": []})
    try:
        with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=10) as client:
            client.starttls(context=insecure())
            client.ehlo()
            assert client.has_extn("auth")
            assert client.docmd("MAIL", "FROM:<x@remote.test>")[0] == 250
            assert client.docmd("RCPT", "TO:<far@remote.example>")[0] == 550  # not yet
            client.rset()
            client.login(ALICE, "secret")
            client.sendmail("x@remote.test", ["far@remote.example"], b"Subject: r\r\n\r\nr\r\n")
    finally:
        srv.stop()


# -- POP3 and IMAP ---------------------------------------------------------------------


def test_pop3_stls_and_pop3s(strict):
    client = poplib.POP3(strict.host, strict.pop3Port, timeout=10)
    caps = client.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.user(ALICE)
    client.stls(context=insecure())
    assert "USER" in client.capa() and "STLS" not in client.capa()
    client.user(ALICE)
    client.pass_("secret")
    client.quit()
    secure = poplib.POP3_SSL(strict.host, strict.ports["pop3s"], context=insecure(), timeout=10)
    assert secure._shortcmd("AUTH PLAIN " + base64.b64encode(
        b"\0alice@example.test\0secret").decode()).startswith(b"+OK")
    assert secure.stat() == (0, 0)
    secure.quit()


def test_imap_starttls_and_imaps(strict):
    client = imaplib.IMAP4(strict.host, strict.imapPort, timeout=10)
    assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
    assert "AUTH=PLAIN" not in client.capabilities
    typ, data = client._simple_command("LOGIN", ALICE, "secret")
    assert typ == "NO" and data[0].startswith(b"[PRIVACYREQUIRED]")
    client.starttls(ssl_context=insecure())
    assert "LOGINDISABLED" not in client.capabilities and "AUTH=PLAIN" in client.capabilities
    client.login(ALICE, "secret")
    client.logout()
    secure = imaplib.IMAP4_SSL(strict.host, strict.ports["imaps"], ssl_context=insecure(),
                               timeout=10)
    assert "STARTTLS" not in secure.capabilities
    secure.login(ALICE, "secret")
    assert secure.select("INBOX")[0] == "OK"
    secure.logout()


# -- STARTTLS command injection (CVE-2011-0411 class) --------------------------------------


@pytest.mark.parametrize("protocol, greeting, starttls, injected, probe", [
    ("smtp", b"220 ", b"EHLO x\r\nSTARTTLS\r\n", b"MAIL FROM:<evil@x>\r\n", b"NOOP\r\n"),
    ("pop3", b"+OK", b"STLS\r\n", b"USER evil@x\r\n", b"PASS guess\r\n"),
    ("imap", b"* OK", b"a STARTTLS\r\n", b"b LOGOUT\r\n", b"c NOOP\r\n"),
])
def test_plaintext_pipelined_after_starttls_is_dropped(strict, protocol, greeting, starttls,
                                                        injected, probe):
    raw = socket.create_connection((strict.host, strict.ports[protocol]), timeout=10)
    assert readAll(raw, b"\r\n").startswith(greeting)
    raw.sendall(starttls + injected)  # one packet: the attack
    ready = {"smtp": b"220 2.0.0", "pop3": b"+OK Begin", "imap": b"a OK"}[protocol]
    plaintext = readAll(raw, ready)
    while not plaintext.endswith(b"\r\n"):
        plaintext += raw.recv(4096)
    assert plaintext.split(ready, 1)[1].count(b"\r\n") == 1, "nothing after the go-ahead"
    tls = insecure().wrap_socket(raw, server_hostname="mx.example.test")
    tls.sendall(probe)
    answer = readAll(tls, b"\r\n")
    first = answer.split(b"\r\n")[0]
    # The first reply over TLS answers the probe, not the injected command.
    expected = {"smtp": b"250 2.0.0", "pop3": b"-ERR USER required before PASS",
                "imap": b"c OK"}[protocol]
    assert first.startswith(expected), (protocol, answer)
    if protocol == "smtp":
        tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
        assert readAll(tls, b"\r\n").startswith(b"503"), "no MAIL FROM was accepted"
    tls.close()


# -- password guessing ---------------------------------------------------------------------


def test_failed_logins_never_lock_out_loopback_or_the_account(dataDir):
    """Failures from this host are slowed (one throttle for every protocol) but never
    blocked, and the account is not locked: the right password still works."""
    addUser(dataDir, ALICE)
    srv = startServer(dataDir, auth={"max_failures": 3, "failure_delay": 0.01})
    try:
        for _ in range(6):
            client = imaplib.IMAP4("127.0.0.1", srv.imapPort, timeout=10)
            typ, _ = client._simple_command("LOGIN", ALICE, "wrong")
            assert typ == "NO"
        pop = poplib.POP3("127.0.0.1", srv.pop3Port, timeout=10)
        pop.user(ALICE)
        assert pop.pass_("secret").startswith(b"+OK")
        pop.quit()
        client = imaplib.IMAP4("127.0.0.1", srv.imapPort, timeout=10)
        assert client._simple_command("LOGIN", ALICE, "secret")[0] == "OK"
    finally:
        srv.stop()
