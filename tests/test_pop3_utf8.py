"""POP3 UTF8 (RFC 6856): UTF-8 mail as stored after the UTF8 command, downgraded header
fields (RFC 6857, L{twistmail.protocols.downgrade}) before it, on every backend."""

from __future__ import annotations

import email
import poplib
from email import policy

import pytest
from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend
from test_imap_utf8 import MESSAGE, SUBJECT

from twistmail.protocols import downgrade
from twistmail.protocols.pop3 import WHOLE_MESSAGE, _Body


def store(server, *messages: bytes) -> None:
    """Into alice's INBOX as SMTPUTF8 delivery leaves them (IMAP APPEND stores them as sent)."""
    with loggedIn(server.imapPort) as imap:
        for message in messages:
            imap.append(message)


def connect(server) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)


def retrieved(p: poplib.POP3, n: int) -> bytes:
    _, lines, _ = p.retr(n)
    return b"\r\n".join(lines) + b"\r\n"


def headerOf(data: bytes) -> bytes:
    return data[:data.index(b"\r\n\r\n") + 4]


def test_utf8_session_gets_the_message_as_stored(server):
    store(server, MESSAGE)
    p = connect(server)
    assert "UTF8" in p.capa()
    assert p.utf8().startswith(b"+OK")
    p.user("alice@example.test")
    p.pass_("secret")
    assert retrieved(p, 1) == MESSAGE
    with pytest.raises(poplib.error_proto, match=r"UTF8 only before login \(RFC 6856 section 2\)"):
        p.utf8()
    p.quit()


def test_legacy_session_gets_a_downgraded_header(server):
    big = MESSAGE + (b"y" * 98 + b"\r\n") * (WHOLE_MESSAGE // 100 + 10)  # streamed in chunks
    store(server, MESSAGE, big)
    p = connect(server)
    p.user("alice@example.test")
    p.pass_("secret")
    body = MESSAGE.split(b"\r\n\r\n", 1)[1]
    for n, stored in ((1, MESSAGE), (2, big)):
        data = retrieved(p, n)
        head = headerOf(data)
        assert head.isascii() and data == head + stored.split(b"\r\n\r\n", 1)[1]
        parsed = email.message_from_bytes(head, policy=policy.default)
        assert parsed["Subject"] == SUBJECT
        assert str(parsed["To"]) == "Ann <ann@xn--bcher-kva.example>, bob@example.test"
    _, top, _ = p.top(1, 0)
    assert b"\r\n".join(top) + b"\r\n" == headerOf(retrieved(p, 1))
    assert retrieved(p, 1).endswith(body)
    # LIST gives the stored size (RFC 1939's counts may be approximate; see pop3.py).
    assert p.list(1).split()[2] == b"%d" % len(MESSAGE)
    p.quit()


UTF8_CASES = [
    MESSAGE,
    MESSAGE.replace(b"\r\n", b"\n"),
    "Subject: ünïcode only\r\n\r\n.dot\r\nend\r\n".encode(),
    "Subject: no body ü".encode(),
    "Subject: x\r\nX-Ü: dropped\r\n\r\nbody\r\n".encode(),
]


@pytest.mark.parametrize("message", UTF8_CASES)
@pytest.mark.parametrize("topLines", [None, 0, 1])
def test_downgrade_does_not_depend_on_where_the_message_is_split(message, topLines):
    """The header is held back across chunks (streaming), then downgraded once."""
    whole = _Body(topLines, legacy=True)
    expected = whole.feed(message) + whole.end()
    assert expected.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].isascii()
    plain = _Body(topLines)
    assert expected == plain.feed(downgradedMessage(message)) + plain.end()
    for split in range(len(message) + 1):
        body = _Body(topLines, legacy=True)
        assert body.feed(message[:split]) + body.feed(message[split:]) + body.end() == expected


def downgradedMessage(message: bytes) -> bytes:
    for blank in (b"\r\n\r\n", b"\n\n"):
        if blank in message:
            head, rest = message.split(blank, 1)
            return downgrade.header(head + blank) + rest
    return downgrade.header(message)


def test_an_endless_header_is_sent_as_it_is(monkeypatch):
    """A header block longer than MAX_HEADER is not held back (memory stays bounded)."""
    monkeypatch.setattr(_Body, "MAX_HEADER", 100)
    message = ("X-Long: " + "ü" * 200 + "\r\n\r\nbody\r\n").encode()
    body = _Body(None, legacy=True)
    out = b"".join(body.feed(message[i:i + 10]) for i in range(0, len(message), 10)) + body.end()
    assert out == message + b".\r\n"
