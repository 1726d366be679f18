"""MIME structure and ENVELOPE over loopback, on every backend: what the bytes say,
where the email package would read it otherwise (issue 12 §2)."""

from __future__ import annotations

from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend

INNER = (b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\n"
         b"Content-Type: text/plain\r\n\r\nplain\r\n--in\r\nContent-Type: text/html\r\n\r\n"
         b"<p>html</p>\r\n--in--\r\n")


def test_sections_of_a_forwarded_message_and_an_odd_header(server):
    client = loggedIn(server.imapPort)
    client.append(b"From: <@relay.example:user@host.example>\r\nSubject: fwd\r\n"
                  b"Content-Type: message/rfc822\r\n\r\n" + INNER)
    client.append(b"Subject: odd\r\nthis line is no header field\r\n"
                  b'Content-Type : multipart/mixed; boundary="a b" (comment)\r\n\r\n'
                  b"preamble\r\n--a b\r\n\r\none\r\n--a b\r\nContent-Type: text/html\r\n\r\n"
                  b"<b>two</b>\r\n--a b--\r\nepilogue\r\n")
    client.ok("SELECT INBOX")
    (line,) = client.ok("FETCH 1 (BODY.PEEK[1.2] BODY.PEEK[1.HEADER] ENVELOPE)")
    assert b"BODY[1.2] {11}\r\n<p>html</p>" in line
    assert b"BODY[1.HEADER] {68}\r\n" + INNER[:68] in line
    assert b'(NIL "@relay.example" "user" "host.example")' in line
    (line,) = client.ok("FETCH 2 (BODYSTRUCTURE BODY.PEEK[2] BODY.PEEK[2.MIME])")
    assert b'"MIXED" ("BOUNDARY" "a b")' in line
    assert b"BODY[2] {10}\r\n<b>two</b>" in line
    assert b"BODY[2.MIME] {27}\r\nContent-Type: text/html\r\n\r\n" in line
