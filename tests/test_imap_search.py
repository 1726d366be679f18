"""SEARCH keys: parsing and evaluation on synthetic messages (no network)."""

from __future__ import annotations

import calendar

import pytest

from twistmail.model import StoredMessage
from twistmail.protocols.imap import search
from twistmail.protocols.imap.parser import Arguments, ParseError

NOON_2024_03_05 = calendar.timegm((2024, 3, 5, 12, 0, 0, 0, 0, 0))

MESSAGES = [
    (b"From: Ann <ann@example.org>\r\nTo: bob@example.org\r\nSubject: Quarterly report\r\n"
     b"Date: Tue, 5 Mar 2024 09:00:00 +0000\r\n\r\nNumbers attached.\r\n", {"\\Seen"}),
    (b"From: =?utf-8?q?Ren=C3=A9?= <rene@example.org>\r\nSubject: =?iso-8859-1?q?caf=E9?=\r\n"
     b"Date: Wed, 6 Mar 2024 23:30:00 -0800\r\nContent-Type: text/plain; charset=utf-8\r\n"
     b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCr=C3=A8me br=C3=BBl=C3=A9e\r\n",
     {"\\Flagged", "urgent"}),
    (b"From: list@example.net\r\nSubject: digest\r\nContent-Type: multipart/mixed; boundary=x\r\n"
     b"\r\n--x\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
     b"aGlkZGVuIHRyZWFzdXJl\r\n--x\r\nContent-Type: application/octet-stream\r\n\r\n"
     b"treasure in binary\r\n--x--\r\n", {"\\Deleted", "\\Answered"}),
]


def candidates() -> list[search.Candidate]:
    out = []
    for n, (data, flags) in enumerate(MESSAGES, 1):
        message = StoredMessage(n * 10, f"u{n}", frozenset(flags), len(data),
                                NOON_2024_03_05 + (n - 1) * 86400)
        out.append(search.Candidate(n, n * 10, message, recent=n == 3, data=data))
    return out


def run(criteria: bytes) -> list[int]:
    args = Arguments([criteria])
    search.parseCharset(args)
    key = search.parseKeys(args, lambda byUid: 30 if byUid else 3)
    return [c.seq for c in candidates() if key.match(c)]


@pytest.mark.parametrize("criteria, expected", [
    (b"ALL", [1, 2, 3]),
    (b"SEEN", [1]), (b"UNSEEN", [2, 3]), (b"FLAGGED", [2]), (b"UNFLAGGED", [1, 3]),
    (b"DELETED", [3]), (b"UNDELETED", [1, 2]), (b"ANSWERED", [3]), (b"DRAFT", []),
    (b"UNDRAFT", [1, 2, 3]), (b"KEYWORD urgent", [2]), (b"UNKEYWORD urgent", [1, 3]),
    (b"RECENT", [3]), (b"NEW", [3]), (b"OLD", [1, 2]),
    (b"FROM ann", [1]), (b"FROM RENE", [2]), (b"FROM ren\xc3\xa9", [2]), (b"TO bob", [1]),
    (b"SUBJECT QUARTERLY", [1]), (b"SUBJECT caf\xc3\xa9", [2]), (b'SUBJECT ""', [1, 2, 3]),
    (b"BODY numbers", [1]), (b"BODY cr\xc3\xa8me", [2]), (b"BODY treasure", [3]),
    (b"BODY binary", []),  # only text parts are searched, decoded
    (b"TEXT quarterly", [1]), (b"TEXT treasure", [3]),
    (b'HEADER Content-Transfer-Encoding ""', [2]), (b"HEADER subject DIGEST", [3]),
    (b"LARGER 237", [3]), (b"LARGER 236", [2, 3]), (b"SMALLER 237", [1]),
    (b"ON 5-Mar-2024", [1]), (b"BEFORE 6-Mar-2024", [1]), (b"SINCE 6-Mar-2024", [2, 3]),
    (b"SENTON 6-Mar-2024", [2]),  # the Date: header's own day, whatever its zone
    (b"SENTBEFORE 6-Mar-2024", [1]), (b"SENTSINCE 5-Mar-2024", [1, 2]),
    (b"1", [1]), (b"2:*", [2, 3]), (b"*", [3]), (b"1,3", [1, 3]),
    (b"UID 20:30", [2, 3]), (b"UID *", [3]),
    (b"NOT SEEN", [2, 3]), (b"OR SEEN FLAGGED", [1, 2]), (b"OR (SEEN DELETED) KEYWORD urgent", [2]),
    (b"(OR SEEN FLAGGED) UNDELETED", [1, 2]), (b"NOT NOT NOT SEEN", [2, 3]),
    (b"CHARSET UTF-8 FROM ren\xc3\xa9", [2]), (b"CHARSET US-ASCII ALL", [1, 2, 3]),
])
def test_search_key(criteria, expected):
    assert run(criteria) == expected


@pytest.mark.parametrize("criteria", [
    b"", b"BOGUS", b"FROM", b"LARGER x", b"BEFORE 1-Foo-2024", b"ON 31-Feb-2024", b"UID 0",
    b"OR SEEN", b"NOT", b"(SEEN", b"()", b"KEYWORD", b"HEADER Subject", b"SEEN extra)",
])
def test_bad_search_syntax(criteria):
    with pytest.raises(ParseError):
        run(criteria)


def test_bad_charset():
    with pytest.raises(search.BadCharset):
        run(b"CHARSET KOI8-R ALL")


def test_nesting_is_bounded():
    with pytest.raises(ParseError, match="nested"):
        run(b"(" * 200 + b"ALL" + b")" * 200)
    with pytest.raises(ParseError, match="nested"):
        run(b"NOT " * 200 + b"ALL")


def test_cheap_keys_are_evaluated_before_reading():
    """With a cheap key failing first, the message is never parsed."""
    args = Arguments([b"DELETED BODY treasure"])
    key = search.parseKeys(args, lambda byUid: 3)
    assert key.needsData
    candidate = candidates()[0]
    candidate.data = None  # would raise if the body key ran
    assert not key.match(candidate)


@pytest.mark.parametrize("header, criteria", [
    # Dovecot matches the address list as "display name <mailbox@domain>", decoded: a quoted
    # encoded word is a name like any other, with no quotes or padding left around it.
    (b'From: "=?utf-8?q?Ren=C3=A9?=" <rene@example.org>', "René <rene@example"),
    (b'From: "Doe, =?utf-8?q?Jane?=" <jane@example.org>', "Doe, Jane <jane@"),
    (b"Cc: =?utf-8?q?Ren=C3=A9?= <rene@example.org>", "rené <RENE@EXAMPLE.ORG>"),
    (b"To: <@relay.example:user@host.example>", "user@host.example"),
    (b"Bcc: team: a@x.example, b@y.example;", "b@y.example"),
])
def test_address_keys_match_the_decoded_addresses(header, criteria):
    data = header + b"\r\nSubject: s\r\n\r\nbody\r\n"
    message = StoredMessage(1, "u1", frozenset(), len(data), NOON_2024_03_05)
    candidate = search.Candidate(1, 1, message, recent=False, data=data)
    field = header.split(b":", 1)[0].decode().upper()
    args = Arguments([f'{field} "{criteria}"'.encode()])
    assert search.parseKeys(args, lambda byUid: 1).match(candidate)


def test_body_with_a_commented_transfer_encoding_is_decoded():
    data = (b"Subject: s\r\nContent-Transfer-Encoding: base64 (it is)\r\n\r\n"
            b"aGlkZGVuIHRyZWFzdXJl\r\n")
    message = StoredMessage(1, "u1", frozenset(), len(data), NOON_2024_03_05)
    candidate = search.Candidate(1, 1, message, recent=False, data=data)
    assert search.parseKeys(Arguments([b"BODY treasure"]), lambda byUid: 1).match(candidate)
