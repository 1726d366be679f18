"""Several clients on one account and one folder at once (issue 12 §1), on every backend.

Real concurrency: imaplib sessions in threads over loopback against the real
server, started together with a barrier; no sleeps.  RFC 2180 §4.1 as Dovecot
does it: a session is served from its own view of the folder, and learns of
other sessions' expunges only where RFC 3501 §7.4.1 allows.
"""

from __future__ import annotations

import imaplib
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from imapwire import RawIMAP
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend

ALICE = "alice@example.test"
SESSIONS = 10


def msg(n: int) -> bytes:
    return (f"From: s{n}@remote.test\r\nTo: {ALICE}\r\nSubject: message {n}\r\n"
            f"Message-ID: <{n}@remote.test>\r\n\r\nbody {n}\r\n").encode()


def together(count: int, work) -> list:
    """Run C{work(i)} in C{count} threads released at once; their results (or exceptions)."""
    barrier = threading.Barrier(count)

    def run(i: int):
        barrier.wait(timeout=30)
        try:
            return work(i)
        except Exception as e:  # reported by the test, with the others' results
            return e

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


class Counting(imaplib.IMAP4):
    """imaplib, also keeping EXISTS and EXPUNGE in the order they came (imaplib's own
    dict of untagged responses loses the order, and some commands take theirs away)."""

    def __init__(self, *args, **kwargs) -> None:
        self.heard: list[tuple[str, bytes]] = []
        super().__init__(*args, **kwargs)

    def _append_untagged(self, typ, dat):
        if typ in ("EXISTS", "EXPUNGE"):
            self.heard.append((typ, dat))
        super()._append_untagged(typ, dat)


def client(server) -> Counting:
    return Counting("127.0.0.1", server.imapPort, timeout=30)


class LoggedFailures:
    """The server's logged failures (tracebacks) while in use: there must be none."""

    def __enter__(self) -> list:
        from twisted.logger import globalLogPublisher

        self.seen: list = []
        self._observer = lambda event: event.get("log_failure") is not None and self.seen.append(
            event["log_failure"].getTraceback()[-2000:])
        globalLogPublisher.addObserver(self._observer)
        return self.seen

    def __exit__(self, *exc) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self._observer)


def allWell(session) -> None:
    """Run C{session(i)} in SESSIONS threads at once: each returns what went wrong for it
    (nothing), and the server logs no failure meanwhile."""
    with LoggedFailures() as logged:
        results = together(SESSIONS, session)
    assert [r for r in results if r] == [] and logged == [], (results, logged)


def test_concurrent_first_logins_of_one_account(server):
    """A mail client opens several connections at once to a new account: every LOGIN
    succeeds, and every special-use folder the first logins create is subscribed."""
    def login(i: int):
        c = client(server)
        try:
            return c.login(ALICE, "secret")[0]
        finally:
            c.logout()

    results = together(SESSIONS, login)
    assert results == ["OK"] * SESSIONS, results
    c = client(server)
    c.login(ALICE, "secret")
    typ, lines = c.lsub()
    c.logout()
    subscribed = {line.decode().rsplit(" ", 1)[1].strip('"') for line in lines}
    assert {"Drafts", "Sent", "Trash", "Junk", "Archive"} <= subscribed, subscribed


def selected(server) -> RawIMAP:
    c = RawIMAP(server.imapPort)
    c.login()
    c.ok("SELECT INBOX")
    return c


def appendMessages(server, count: int) -> None:
    c = RawIMAP(server.imapPort)
    c.login()
    for n in range(1, count + 1):
        data = msg(n)
        c.ok(b"APPEND INBOX (\\Flagged) {%d+}\r\n" % len(data) + data)
    c.close()


def test_fetch_store_search_of_a_message_another_session_expunged(server):
    """RFC 2180 §4.1 as Dovecot does it: until this session is told of the expunge
    (RFC 3501 §7.4.1: not during FETCH, STORE or SEARCH), it is served from its own
    view: UID, FLAGS, INTERNALDATE and RFC822.SIZE as they were; what needs the gone
    message's text is NIL, and the FETCH ends with OK [EXPUNGEISSUED] (Dovecot's
    imap-fetch.c "nil reply", cmd-fetch.c).  STORE on it does nothing and succeeds
    (Dovecot's cmd-store.c).  Nothing fails."""
    appendMessages(server, 2)
    a, b = selected(server), selected(server)
    [date] = a.ok("FETCH 1 (INTERNALDATE)")
    b.ok("STORE 1 +FLAGS (\\Deleted)")
    b.ok("EXPUNGE")

    untagged, status = a.command("FETCH 1 (UID FLAGS RFC822.SIZE INTERNALDATE)")
    assert status.startswith(b"OK"), status
    match = re.fullmatch(rb"\* 1 FETCH \(UID 1 FLAGS \(([^)]*)\) RFC822.SIZE (\d+) (INTERNALDATE .*)\)",
                         untagged[0])
    assert len(untagged) == 1 and match, untagged
    assert set(match[1].split()) - {b"\\Recent"} == {b"\\Flagged", b"\\Deleted"}
    assert int(match[2]) == len(msg(1))
    assert date == b"* 1 FETCH (" + match[3] + b")"
    untagged, status = a.command("FETCH 1:2 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)] ENVELOPE)")
    assert status.startswith(b"OK [EXPUNGEISSUED]"), status
    assert untagged[0] == (b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (SUBJECT)] NIL "
                           b"ENVELOPE (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL))")
    assert untagged[1].startswith(b"* 2 FETCH (UID 2 BODY[HEADER.FIELDS (SUBJECT)] {")
    untagged, status = a.command("FETCH 1 (BODY BODYSTRUCTURE RFC822)")
    assert status.startswith(b"OK [EXPUNGEISSUED]"), status
    assert untagged == [b'* 1 FETCH (BODY ("text" "plain" NIL NIL NIL "7bit" 0 0) '
                        b'BODYSTRUCTURE ("text" "plain" NIL NIL NIL "7bit" 0 0 NIL NIL NIL NIL) '
                        b'RFC822 NIL)']
    untagged = a.ok("STORE 1:2 +FLAGS (\\Seen)")
    assert len(untagged) == 1 and untagged[0].startswith(b"* 2 FETCH (FLAGS ("), untagged
    assert a.ok("SEARCH FLAGGED") == [b"* SEARCH 1 2"]
    assert a.ok("SEARCH BODY \"body\"") == [b"* SEARCH 2"]
    # Told at last (NOOP may): the numbers move.
    assert a.ok("NOOP") == [b"* 1 EXPUNGE"]
    assert a.ok("FETCH 1 (UID)") == [b"* 1 FETCH (UID 2)"]


def test_ten_sessions_append_fetch_store_search_expunge_in_one_folder(server):
    """Ten sessions working one folder at once: every command of every session
    succeeds, though each keeps seeing messages the others expunged."""
    appendMessages(server, 20)
    rounds = 12

    def session(i: int) -> list:
        c = client(server)
        c.login(ALICE, "secret")
        failures = []
        count = 0

        def run(*command):
            nonlocal count
            try:
                typ, data = (c.uid(*command[1:]) if command[0] == "UID"
                             else getattr(c, command[0].lower())(*command[1:]))
            except imaplib.IMAP4.error as e:
                typ, data = "BAD", [str(e).encode()]
            if typ != "OK":
                failures.append((command, typ, data))
            for kind, value in c.heard:  # in the order the server sent them
                count = int(value) if kind == "EXISTS" else count - 1
            c.heard.clear()
            c.untagged_responses.clear()
            return data

        run("SELECT", "INBOX")
        for n in range(rounds):
            run("APPEND", "INBOX", None, None, msg(100 * i + n))
            run("NOOP")
            if count:
                run("FETCH", f"1:{count}", "(UID FLAGS RFC822.SIZE INTERNALDATE)")
                run("FETCH", f"{max(1, count - 3)}:{count}", "(BODY.PEEK[] ENVELOPE BODYSTRUCTURE)")
                run("STORE", f"1:{count}", "+FLAGS.SILENT", "(\\Seen)")
                run("STORE", str(count), "+FLAGS", "(\\Deleted)")
                run("FETCH", f"1:{count}", "(FLAGS BODY[HEADER.FIELDS (SUBJECT)])")
            run("SEARCH", None, "TEXT", "body")
            run("UID", "SEARCH", "FLAGGED")
            run("UID", "FETCH", "1:*", "(FLAGS)")
            run("EXPUNGE")
        c.logout()
        return failures

    allWell(session)


def test_keyword_limit_is_a_limit_never_a_serverbug(server):
    """A folder's last keyword letters taken by another session (Maildir has 26): a STORE
    or an APPEND that needs one more is refused with NO [LIMIT], not NO [SERVERBUG].
    (APPEND has no check of its own: the store's refusal is what answers, as for a
    STORE that lost the race for the last letter after its check.)"""
    appendMessages(server, 1)
    a, b = selected(server), selected(server)
    a.ok("STORE 1 +FLAGS (" + " ".join(f"k{n}" for n in range(26)) + ")")
    data = msg(2)
    for c, command in ((b, b"STORE 1 +FLAGS (more)"),
                       (b, b"APPEND INBOX (another) {%d+}\r\n" % len(data) + data)):
        untagged, status = c.command(command)
        if server.backend == "maildir":
            assert status.startswith(b"NO [LIMIT]"), (command, status)
        else:  # mbox keywords have no limit
            assert status.startswith(b"OK"), (command, status)


def test_ten_sessions_change_one_accounts_folders_at_once(server):
    """Sessions of one account creating, deleting, renaming, subscribing, selecting,
    appending to and asking STATUS of the same few folders at once: answers are OK or
    a clear NO ([NONEXISTENT], [ALREADYEXISTS], [TRYCREATE]), never BAD or [SERVERBUG],
    and the server logs no failure.  A session whose selected folder is deleted under
    it may be told BYE, as Dovecot does."""
    def session(i: int) -> list:
        rnd = random.Random(i)
        c = client(server)
        c.login(ALICE, "secret")
        wrong = []
        for n in range(40):
            a, b = f"F{rnd.randrange(3)}", f"F{rnd.randrange(3)}/S{i}"
            command = rnd.choice([
                ("create", a), ("delete", a), ("rename", a, b), ("subscribe", a),
                ("unsubscribe", a), ("list",), ("status", a, "(MESSAGES UIDNEXT)"),
                ("select", a), ("append", a, None, None, msg(n))])
            try:
                typ, data = getattr(c, command[0])(*command[1:])
            except imaplib.IMAP4.abort:
                assert "BYE" in c.untagged_responses, command
                c = client(server)
                c.login(ALICE, "secret")
                continue
            except imaplib.IMAP4.error as e:
                typ, data = "BAD", [str(e).encode()]
            text = b" ".join(d for d in data if isinstance(d, bytes))
            if typ == "BAD" or b"SERVERBUG" in text:
                wrong.append((command, typ, text))
        c.logout()
        return wrong

    allWell(session)


def test_selected_folder_deleted_by_another_session(server):
    """RFC 2180 §3, as Dovecot does it: a session whose selected folder another session
    deleted is told BYE at its next NOOP (or CHECK, or IDLE), not left with NO to every
    command in a folder that no longer exists."""
    c = RawIMAP(server.imapPort)
    c.login()
    c.ok("CREATE Work")
    c.ok("SELECT Work")
    other = RawIMAP(server.imapPort)
    other.login()
    other.ok("DELETE Work")
    c.send(b"n1 NOOP\r\n")
    assert c.line() == b"* BYE Selected mailbox was deleted, have to disconnect"
    with pytest.raises(ConnectionError):  # no tagged answer: the connection is closed
        c.line()
