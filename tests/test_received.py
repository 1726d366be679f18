"""Item 7: Received headers say how the message came (RFC 3848) and can keep a user's
address private; over loopback with smtplib, as mail clients submit."""

from __future__ import annotations

import smtplib

import pytest
from support import addUser, startServer, storedMessages
from test_tls import insecure

ALICE, BOB = "alice@example.test", "bob@example.test"
MSG = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def users(dataDir):
    for user in (ALICE, BOB):
        addUser(dataDir, user)
    started = []

    def start(**submission):
        srv = startServer(dataDir, submission=submission, smtp={"auth": True})
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def received(srv, address=BOB) -> bytes:
    [message] = storedMessages(srv.dataDir, address)
    return message.split(b"\r\n\r\n")[0].split(b";")[0]


@pytest.mark.parametrize("tls, auth, protocol", [
    (False, False, b"ESMTP"), (True, False, b"ESMTPS"),
    (False, True, b"ESMTPA"), (True, True, b"ESMTPSA"),
    (False, False, b"UTF8SMTP"), (True, False, b"UTF8SMTPS"),
    (False, True, b"UTF8SMTPA"), (True, True, b"UTF8SMTPSA"),
])
def test_with_clause_names_tls_and_authentication(users, tls, auth, protocol):
    """RFC 3848 §2, on the MX port (AUTH offered there with [smtp] auth = true);
    RFC 6531 §3.7.3 for a transaction with SMTPUTF8."""
    srv = users()
    with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=10) as s:
        s.ehlo("laptop.example")
        if tls:
            s.starttls(context=insecure())
            s.ehlo("laptop.example")
        if auth:
            s.login(ALICE, "secret")
        s.sendmail(ALICE if auth else "x@remote.test", [BOB], MSG,
                   mail_options=["SMTPUTF8"] if protocol.startswith(b"UTF8") else [])
    header = received(srv)
    assert b" with " + protocol + b" id " in header, header
    assert header.startswith(b"Received: from laptop.example ([127.0.0.1])")


def test_submission_over_implicit_tls_says_esmtpsa(users):
    srv = users()
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], context=insecure(),
                          timeout=10) as s:
        s.ehlo("laptop.example")
        s.login(ALICE, "secret")
        s.sendmail(ALICE, [BOB], MSG)
    assert b" with ESMTPSA id " in received(srv)


def test_submission_accepts_a_utf8_message_from_its_user(users):
    """SMTPUTF8 is offered on the submission ports too; sender ownership compares
    canonical addresses."""
    srv = users()
    message = "From: alice@example.test\r\nTo: bob@example.test\r\nSubject: Grüße\r\n\r\nü\r\n"
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], context=insecure(),
                          timeout=10) as s:
        s.ehlo("laptop.example")
        assert s.has_extn("smtputf8")
        s.login(ALICE, "secret")
        s.sendmail("ALICE@EXAMPLE.TEST", [BOB], message.encode(), mail_options=["SMTPUTF8"])
    assert b" with UTF8SMTPSA id " in received(srv)


def test_helo_says_smtp(users):
    srv = users()
    with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=10) as s:
        s.helo("old.example")
        s.sendmail("x@remote.test", [BOB], MSG)
    assert b" with SMTP id " in received(srv)


def test_an_authenticated_clients_address_can_be_left_out(users):
    """[submission] received_client_address = false: no HELO name, no IP address."""
    srv = users(received_client_address=False)
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s.ehlo("alices-laptop.home")
        s.starttls(context=insecure())
        s.ehlo("alices-laptop.home")
        s.login(ALICE, "secret")
        s.sendmail(ALICE, [BOB], MSG)
    header = received(srv)
    assert header.startswith(b"Received: by mx.example.test (twistmail) with ESMTPSA id "), header
    assert b"127.0.0.1" not in header and b"alices-laptop" not in header
    # Mail from the internet still names its client.
    with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=10) as s:
        s.ehlo("mx.remote.test")
        s.sendmail("x@remote.test", [ALICE], MSG)
    assert received(srv, ALICE).startswith(b"Received: from mx.remote.test ([127.0.0.1])")
