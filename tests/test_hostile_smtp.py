"""SMTP against a hostile client: what Twisted's ESMTP would let through, and our answers.

Each test sends what a hostile (or just broken) client can send, and checks
for a clear reply, no logged traceback, and a session that goes on.
"""

from __future__ import annotations

import base64

import pytest
from hostile import errors, logged, smtpDialog  # noqa: F401 - logged is a fixture

EHLO = b"EHLO client.example"


def test_auth_without_a_mechanism_is_a_syntax_error(server, logged):  # noqa: F811
    """Twisted's ext_AUTH indexes the first word: a bare AUTH raised IndexError and the
    connection was dropped with an "Unhandled Error" traceback in the log."""
    port = server.ports["submission"]
    replies = smtpDialog(port, [EHLO, b"AUTH", b"AUTH   "])
    assert replies[1].startswith(b"501 5.5.4 ") and replies[2].startswith(b"501 5.5.4 ")
    assert errors(logged) == []


@pytest.mark.parametrize("verb", [b"\xff\xfe", b"MA\xe9IL FROM:<a@remote.test>", b"\xc3\xa9HLO x",
                                  b"\x00", b"NO\x00OP"])
def test_non_ascii_command_verb_is_an_unknown_command(server, logged, verb):  # noqa: F811
    """Twisted's lookupMethod decodes the verb as ASCII: 8-bit bytes raised
    UnicodeDecodeError and dropped the connection."""
    [reply] = smtpDialog(server.smtpPort, [verb])
    assert reply.startswith(b"500 5.5.2 ")
    assert errors(logged) == []


@pytest.mark.parametrize("path, status", [
    (b'"\xff"@remote.test', b"5.1.7"), (b'"caf\xc3\xa9"@remote.test', b"5.6.7"),
    (b'"a\x00b"@remote.test', b"5.1.7"), (b'"a\rb"@remote.test', b"5.1.7"),
    (b'"a\x1bb"@remote.test', b"5.1.7")])
def test_eight_bit_or_control_characters_in_the_sender_are_refused(server, logged, path,  # noqa: F811
                                                                   status):
    """RFC 5321 §4.1.2 allows only printable ASCII in a quoted local part, and without
    SMTPUTF8 (RFC 6531 §3.5: 553 5.6.7 for UTF-8) nothing else.  Twisted's Address accepted
    any byte inside quotes; str() of it then raised in DATA, dropping the connection."""
    replies = smtpDialog(server.smtpPort, [
        EHLO, b"MAIL FROM:<" + path + b">", b"RCPT TO:<alice@example.test>", b"DATA"])
    assert replies[1].startswith(b"553 " + status + b" "), replies
    assert replies[2].startswith(b"503 ") and replies[3].startswith(b"503 ")
    assert errors(logged) == []


@pytest.mark.parametrize("path", [b'"\xff"@example.test', b'"alice\x00"@example.test',
                                  b'"a\rb"@remote.test'])
def test_eight_bit_or_control_characters_in_a_recipient_are_refused(server, logged, path):  # noqa: F811
    """The same for RCPT TO: Twisted accepted it and our validateTo raised on str()."""
    replies = smtpDialog(server.smtpPort, [
        EHLO, b"MAIL FROM:<x@remote.test>", b"RCPT TO:<" + path + b">"])
    assert replies[2].startswith(b"553 5.1.3 "), replies
    assert errors(logged) == []


def test_internal_error_in_a_command_is_answered_and_the_session_goes_on(server, logged,  # noqa: F811
                                                                        monkeypatch):
    """Whatever a handler raises (here: the spool cannot be created) is answered with
    451 instead of dropping the connection with nothing said."""
    from twistmail.protocols import smtp

    def broken(*args, **kwargs):
        raise OSError("spool directory unwritable")

    monkeypatch.setattr(smtp, "MessageSource", broken)
    replies = smtpDialog(server.smtpPort, [
        EHLO, b"MAIL FROM:<x@remote.test>", b"RCPT TO:<alice@example.test>", b"DATA", b"RSET"])
    assert replies[3].startswith(b"451 4.3.0 "), replies
    assert replies[4].startswith(b"250 ")
    failures = errors(logged)
    assert len(failures) == 1 and "spool directory unwritable" in failures[0]


def test_auth_payload_never_reaches_the_log(server, logged):  # noqa: F811
    """Failed, malformed and cancelled AUTH exchanges: the log has the user name
    (escaped), never the password or the base64 that carries it."""
    secret = "hunter2-\N{SNOWMAN}"
    plain = base64.b64encode(b"\0alice@example.test\0" + secret.encode())
    port = server.ports["submission"]
    smtpDialog(port, [EHLO, b"AUTH PLAIN " + plain, b"AUTH PLAIN " + plain[:-3] + b"!!!",
                      b"AUTH LOGIN", base64.b64encode(b"alice@example.test"),
                      base64.b64encode(secret.encode()), b"AUTH PLAIN", b"*"])
    text = repr(logged)
    assert "hunter2" not in text and plain.decode() not in text and plain[:20].decode() not in text
    assert errors(logged) == []
