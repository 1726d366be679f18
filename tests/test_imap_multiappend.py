"""MULTIAPPEND (RFC 3502): several messages in one APPEND, stored all or none, on every backend."""

from __future__ import annotations

import re

import pytest
from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend
from twisted.internet import defer

from twistmail.errors import StorageError
from twistmail.protocols.imap import multiappend


def message(n: int) -> bytes:
    return b"From: a@remote.test\r\nSubject: multi %d\r\n\r\nbody %d\r\n" % (n, n)


@pytest.fixture
def imap(server):
    with loggedIn(server.imapPort) as client:
        yield client


def count(imap, folder: str = "INBOX") -> int:
    [line] = imap.ok(f"STATUS {folder} (MESSAGES)")
    return int(re.search(rb"MESSAGES (\d+)", line).group(1))


def test_capability(imap):
    [line] = imap.ok("CAPABILITY")
    assert b" MULTIAPPEND" in line


def test_three_messages_in_one_append(imap):
    one, two, three = message(1), message(2), message(3)
    imap.send(b"a1 APPEND INBOX (\\Seen) {%d+}\r\n%s" % (len(one), one) +
              b' ($Work) "05-Mar-2023 14:30:00 +0100" {%d}\r\n' % len(two))
    assert imap.line().startswith(b"+ ")
    imap.send(two + b" {%d+}\r\n%s\r\n" % (len(three), three))
    untagged, tagged = imap.until(b"a1")
    m = re.match(rb"OK \[APPENDUID \d+ 1:3\]", tagged)
    assert m, (untagged, tagged)
    imap.ok("SELECT INBOX")
    lines = imap.ok("FETCH 1:3 (FLAGS INTERNALDATE BODY.PEEK[])")
    assert [line.endswith(body + b")") for line, body in zip(lines, (one, two, three), strict=True)] \
        == [True] * 3
    assert b"\\Seen" in lines[0] and b"$Work" in lines[1] and b'"05-Mar-2023 13:30:00 +0000"' in lines[1]


def test_a_bad_third_message_stores_none(imap):
    one = message(1)
    _, tagged = imap.command(b"APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s (\\Bogus) {%d+}\r\n%s"
                             % (len(one), one, len(one), one, len(one), one))
    assert tagged.startswith(b"BAD"), tagged
    assert count(imap) == 0


def test_too_many_messages_is_refused_and_stores_none(imap):
    one = b"Subject: x\r\n\r\ny\r\n"
    piece = b" {%d+}\r\n%s" % (len(one), one)
    _, tagged = imap.command(b"APPEND INBOX" + piece * (multiappend.MAX_MESSAGES + 1))
    assert tagged.startswith(b"NO [LIMIT]"), tagged
    assert count(imap) == 0
    _, tagged = imap.command(b"APPEND INBOX" + piece * 5)
    assert tagged.startswith(b"OK [APPENDUID"), tagged
    assert count(imap) == 5


class _FailingMailbox:
    """Stores two messages, fails on the third."""

    def __init__(self) -> None:
        self.stored: list[int] = []

    def append(self, source, flags=(), internalDate=None):
        if len(self.stored) == 2:
            return defer.fail(StorageError("disk full"))
        self.stored.append(len(self.stored) + 1)
        return defer.succeed(self.stored[-1])

    def remove(self, uids):
        self.stored = [u for u in self.stored if u not in uids]
        return defer.succeed(list(uids))


def test_a_storage_failure_removes_what_was_stored():
    mailbox = _FailingMailbox()
    d = defer.Deferred.fromCoroutine(multiappend.appendAll(mailbox, [(b"m", set(), None)] * 3))
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(StorageError)
    assert mailbox.stored == []
