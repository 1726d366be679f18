"""Several clients on one account and one folder at once (issue 12 §1), on every backend.

Real concurrency: imaplib sessions in threads over loopback against the real
server, started together with a barrier; no sleeps.  RFC 2180 §4.1 as Dovecot
does it: a session is served from its own view of the folder, and learns of
other sessions' expunges only where RFC 3501 §7.4.1 allows.
"""

from __future__ import annotations

import imaplib
import threading
from concurrent.futures import ThreadPoolExecutor

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


def client(server) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", server.imapPort, timeout=30)
    return c


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
