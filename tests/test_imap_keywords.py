"""New keywords are announced before any FETCH shows them (issue 12 §1), on every backend.

RFC 3501 §7.2.6: the FLAGS response lists the flags the folder knows; a
client (Thunderbird, mutt) keeps its keyword list from it, so a keyword must be
in an untagged FLAGS (and PERMANENTFLAGS) before a FETCH carries it, in the
session that set it and in every other session with the folder selected, at
the next point where untagged responses are allowed.  ``NIL`` is an atom
(RFC 3501 §9 flag-keyword), not an empty flag.
"""

from __future__ import annotations

import re
import threading

from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend
from test_imap_concurrency import together

MESSAGE = (b"From: s@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n"
           b"Message-ID: <k@remote.test>\r\n\r\nbody\r\n")


def announced(untagged: list[bytes], keyword: bytes) -> None:
    """C{keyword} is in FLAGS and PERMANENTFLAGS, both before the first FETCH carrying it."""
    flags = [i for i, u in enumerate(untagged) if u.startswith(b"* FLAGS ")]
    permanent = [i for i, u in enumerate(untagged) if u.startswith(b"* OK [PERMANENTFLAGS ")]
    fetches = [i for i, u in enumerate(untagged)
               if re.match(rb"\* \d+ FETCH", u) and re.search(rb"[( ]%s[ )]" % re.escape(keyword), u)]
    assert flags and permanent and fetches, untagged
    assert keyword in untagged[flags[0]].split(b"(")[1].rstrip(b")").split(), untagged
    assert keyword in untagged[permanent[0]].split(b"(")[1].split(b")")[0].split(), untagged
    assert b"\\*" in untagged[permanent[0]], untagged
    assert flags[0] < fetches[0] and permanent[0] < fetches[0], untagged


def test_new_keyword_announced_to_the_storing_session_and_to_others(server):
    writer = loggedIn(server.imapPort)
    writer.append(MESSAGE)
    mine, other = loggedIn(server.imapPort), loggedIn(server.imapPort)
    mine.ok("SELECT INBOX")
    other.ok("SELECT INBOX")
    announced(mine.ok("STORE 1 +FLAGS ($Work)"), b"$Work")
    announced(other.ok("NOOP"), b"$Work")
    # Announced once: a second keyword change with nothing new says no FLAGS again.
    assert not [u for u in mine.ok("STORE 1 -FLAGS ($Work)") if u.startswith(b"* FLAGS")]


def test_keyword_appended_by_another_session_is_announced_before_its_fetch(server):
    watcher, writer = loggedIn(server.imapPort), loggedIn(server.imapPort)
    writer.append(MESSAGE)
    watcher.ok("SELECT INBOX")
    writer.append(MESSAGE, "$Later")
    untagged = watcher.ok("NOOP")
    assert any(u.startswith(b"* FLAGS ") and b"$Later" in u for u in untagged), untagged
    announced(untagged + watcher.ok("FETCH 2 FLAGS"), b"$Later")


def test_nil_is_a_keyword(server):
    client = loggedIn(server.imapPort)
    client.append(MESSAGE, "NIL \\Seen")
    untagged = client.ok("SELECT INBOX")
    (flags,) = [u for u in untagged if u.startswith(b"* FLAGS ")]
    assert b"NIL" in flags.split(b"(")[1].rstrip(b")").split()
    (fetched,) = client.ok("FETCH 1 FLAGS")
    assert sorted(fetched.split(b"FLAGS (")[1].rstrip(b"))").split()) == [b"NIL", b"\\Recent", b"\\Seen"]
    client.ok("STORE 1 -FLAGS (NIL)")
    (fetched,) = client.ok("FETCH 1 FLAGS")
    assert b"NIL" not in fetched
    announced(client.ok("STORE 1 +FLAGS (NIL $Other)"), b"$Other")
    (fetched,) = client.ok("FETCH 1 FLAGS")
    assert b"NIL" in fetched.split(b"FLAGS (")[1].split()
    assert b"* SEARCH 1" in client.ok("SEARCH KEYWORD NIL")
    client.ok("STORE 1 FLAGS NIL")  # the bare form: one flag, not an empty list
    (fetched,) = client.ok("FETCH 1 FLAGS")
    assert sorted(fetched.split(b"FLAGS (")[1].rstrip(b"))").split()) == [b"NIL", b"\\Recent"]


def test_sessions_adding_keywords_at_once_each_see_them_announced_first(server):
    """Six sessions each add their own keyword to one message at once, then NOOP: in what
    each session heard, every keyword a FETCH shows was in an earlier FLAGS."""
    loggedIn(server.imapPort).append(MESSAGE)
    clients = [loggedIn(server.imapPort) for _ in range(6)]
    heard = [c.ok("SELECT INBOX") for c in clients]

    stored = threading.Barrier(6)

    def work(i: int) -> list[bytes]:
        lines = clients[i].ok(f"STORE 1 +FLAGS ($Label{i})")
        # Every STORE done before any NOOP: else a fast session's NOOP could come before a
        # slow one's STORE (the postgresql backend commits each STORE in the database).
        stored.wait(timeout=30)
        return lines + clients[i].ok("NOOP")

    results = together(6, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    for before, after in zip(heard, results, strict=True):
        known: set[bytes] = set()
        for line in before + after:
            if line.startswith(b"* FLAGS ("):
                known = set(line[len(b"* FLAGS ("):-1].split())
            elif b" FETCH " in line:
                shown = set(line.split(b"FLAGS (")[1].split(b")")[0].split()) - {b"\\Recent"}
                assert shown <= known, (line, known)
        assert {b"$Label%d" % i for i in range(6)} <= known
