"""\\Recent (RFC 3501 §2.3.2) across sessions, on every backend (issue 12 §1).

A delivered or appended message is \\Recent in exactly one session: the
first that SELECTs the folder, or the one that has it selected when the
message arrives (Dovecot's rule).  EXAMINE shows what no session has claimed
yet without taking it; STATUS (RECENT) counts what no session has claimed;
SEARCH RECENT/NEW/OLD and the RECENT response agree.
"""

from __future__ import annotations

import imaplib
import re
import smtplib

from imapwire import RawIMAP, loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend
from test_imap_concurrency import together

ALICE = "alice@example.test"
MESSAGE = (b"From: s@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n"
           b"Message-ID: <r@remote.test>\r\n\r\nbody\r\n")


def session(server) -> RawIMAP:
    return loggedIn(server.imapPort)


def append(client: RawIMAP) -> None:
    """APPEND with an INTERNALDATE from before the server started (as a client copying old mail)."""
    client.append(MESSAGE, date="01-Jan-2020 10:00:00 +0000")


def recentCount(untagged: list[bytes]) -> int:
    return int(next(re.match(rb"\* (\d+) RECENT", u).group(1) for u in untagged
                    if re.match(rb"\* \d+ RECENT", u)))


def statusRecent(client: RawIMAP) -> int:
    (line,) = client.ok("STATUS INBOX (RECENT)")
    return int(re.search(rb"RECENT (\d+)", line).group(1))


def searched(client: RawIMAP, key: str) -> list[int]:
    (line,) = [u for u in client.ok("SEARCH " + key) if u.startswith(b"* SEARCH")]
    return [int(n) for n in line.split()[2:]]


def test_appended_message_is_recent_in_the_first_session_that_selects(server):
    writer, first, second = session(server), session(server), session(server)
    append(writer)
    assert statusRecent(first) == 1  # nobody has claimed it
    assert recentCount(first.ok("SELECT INBOX")) == 1
    assert searched(first, "RECENT") == [1]
    assert searched(first, "NEW") == [1]
    assert searched(first, "OLD") == []
    assert b"\\Recent" in first.ok("FETCH 1 FLAGS")[0]
    assert statusRecent(second) == 0
    assert recentCount(second.ok("SELECT INBOX")) == 0
    assert searched(second, "RECENT") == []
    assert searched(second, "OLD") == [1]
    assert b"\\Recent" not in second.ok("FETCH 1 FLAGS")[0]


def test_examine_does_not_take_recent(server):
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        s.sendmail("x@remote.test", [ALICE], MESSAGE)
    looker, taker = session(server), session(server)
    assert recentCount(looker.ok("EXAMINE INBOX")) == 1  # shown, not taken (RFC 3501 §6.3.2)
    assert statusRecent(taker) == 1
    assert recentCount(taker.ok("SELECT INBOX")) == 1
    assert searched(taker, "RECENT") == [1]
    assert statusRecent(looker) == 0


def test_recent_in_exactly_one_of_many_sessions(server):
    """Two messages are appended; ten sessions SELECT at once; three more are appended
    while they have the folder selected, and each asks (at once) what is new: between
    them, each of the five messages is recent exactly once."""
    writer = session(server)
    append(writer)
    append(writer)
    clients = []
    for _ in range(10):
        c = imaplib.IMAP4("127.0.0.1", server.imapPort, timeout=30)
        c.login(ALICE, "secret")
        clients.append(c)

    def select(i: int) -> list[int]:
        typ, _ = clients[i].select("INBOX")
        assert typ == "OK"
        typ, data = clients[i].search(None, "RECENT")
        return [int(n) for n in data[0].split()]

    def poll(i: int) -> list[int]:
        clients[i].noop()
        typ, data = clients[i].search(None, "RECENT")
        assert typ == "OK"
        return [int(n) for n in data[0].split()]

    selected = together(10, select)
    for _ in range(3):
        append(writer)
    polled = together(10, poll)
    results = selected + polled
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(bool(r) for r in selected) == 1  # one session took both
    for before, after in zip(selected, polled, strict=True):
        assert set(before) <= set(after)  # still recent in the session that took it
    claimed = sorted(n for r in polled for n in r)
    assert claimed == [1, 2, 3, 4, 5]
    assert statusRecent(writer) == 0
    for c in clients:
        c.logout()
