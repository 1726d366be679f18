"""Two real ``twistd -n twistmail`` nodes on one PostgreSQL: changes made through one
reach IMAP sessions on the other at once (LISTEN/NOTIFY), also after PostgreSQL
restarts under them.

While a node listens for notifications its fallback poll runs every
FALLBACK_INTERVAL (30 s), so an update within a second can only be the push.
"""

from __future__ import annotations

import smtplib
import time

import pytest
from imapwire import RawIMAP
from pgproc import PostgresProcess
from serverproc import ServerProcess, listenerArgs, twistdCommand, waitUntil
from support import addUser, freePort

from twistmail.storage.postgresql import schema, store

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"
LISTENING = "listening for other nodes' changes on channel"
#: How soon another node's change must show (the task: within a second).
PUSH_DEADLINE = 1.0


def message(n: int) -> bytes:
    return (f"From: bob@remote.test\r\nTo: {ALICE}\r\nSubject: push {n}\r\n"
            f"Message-ID: <push{n}@remote.test>\r\n\r\nbody {n}\r\n").encode()


class Node:
    def __init__(self, tmp_path, name: str, dsn: str) -> None:
        self.dataDir = str(tmp_path / name)
        addUser(self.dataDir, ALICE)
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[server]\nhostname = "{name}.example.test"\n'
                          '[storage]\nbackend = "postgresql"\n'
                          f'[storage.postgresql]\ndsn = "{dsn}"\n')
        self.smtp, self.pop3, self.imap = freePort(), freePort(), freePort()
        self.process = ServerProcess(
            twistdCommand("--config", str(config), "--data-dir", self.dataDir,
                          *listenerArgs(self.smtp, self.pop3, self.imap)),
            logPath=str(tmp_path / f"{name}.log"), cwd=str(tmp_path)).start()
        self.process.waitReady(self.smtp, self.pop3, self.imap)

    def deliver(self, n: int) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp, timeout=30) as s:
            s.sendmail("bob@remote.test", [ALICE], message(n))

    def listening(self, times: int = 1) -> None:
        """Wait until this node has (re)connected its listening connection C{times} times."""
        self.process.waitForLog(lambda log: log.count(LISTENING) >= times,
                                f"LISTEN number {times}", timeout=30)

    def imap_(self) -> RawIMAP:
        client = RawIMAP(self.imap)
        client.login(ALICE)
        return client


@pytest.fixture(scope="module")
def cluster():
    with PostgresProcess() as pg:
        yield pg


@pytest.fixture
def nodes(cluster, tmp_path):
    dsn = cluster.dsn(str(tmp_path))
    schema.upgrade(dsn)
    started = []
    try:
        for name in ("a", "b"):
            started.append(Node(tmp_path, name, dsn.replace('"', '\\"')))
        yield started
    finally:
        for node in started:
            node.process.stop()
    for node in started:
        assert "Traceback" not in node.process.log, node.process.describe()


def idling(node: Node) -> RawIMAP:
    """A session on C{node} with INBOX selected, in IDLE."""
    client = node.imap_()
    client.ok("SELECT INBOX")
    client.send(b"i IDLE\r\n")
    assert client.line().startswith(b"+ ")
    node.listening()
    return client


def nextUntagged(client: RawIMAP, want: bytes, since: float) -> tuple[bytes, float]:
    """The first untagged line containing C{want}, and how long after C{since} it came."""
    while True:
        line = client.line(timeout=10)
        if want in line:
            return line, time.monotonic() - since


def test_idle_on_b_sees_mail_delivered_through_a_within_a_second(nodes):
    a, b = nodes
    assert store.FALLBACK_INTERVAL > 10 * PUSH_DEADLINE  # so only the push is that fast
    with idling(b) as client:
        for n in range(3):
            a.deliver(n)
            sent = time.monotonic()
            line, took = nextUntagged(client, b" EXISTS", sent)
            assert line == b"* %d EXISTS" % (n + 1)
            assert took < PUSH_DEADLINE, f"EXISTS after {took:.2f}s"


def test_flag_change_and_expunge_on_a_reach_idle_and_noop_on_b(nodes):
    a, b = nodes
    a.deliver(1)
    a.deliver(2)
    with idling(b) as watcher, b.imap_() as noop, a.imap_() as writer:
        noop.ok("SELECT INBOX")
        writer.ok("SELECT INBOX")
        writer.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
        line, took = nextUntagged(watcher, b"FETCH", time.monotonic())
        assert line.startswith(b"* 1 FETCH (") and b"\\Seen" in line, line
        assert took < PUSH_DEADLINE
        # The NOOP session hears of it at its next command (its folder is refreshed by
        # the same push, so no wait is needed beyond the IDLE session's).
        assert any(b"\\Seen" in u and u.startswith(b"* 1 FETCH")
                   for u in noop.ok("NOOP")), "NOOP on b did not report the new flag"

        writer.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        writer.ok("EXPUNGE")
        sent = time.monotonic()
        line, took = nextUntagged(watcher, b"EXPUNGE", sent)
        assert line == b"* 2 EXPUNGE"
        assert took < PUSH_DEADLINE
        assert b"* 2 EXPUNGE" in noop.ok("NOOP")


def test_pushes_resume_after_postgresql_restarts(cluster, nodes):
    a, b = nodes
    with idling(b) as client:
        cluster.pause()
        b.process.waitForLog(lambda log: "listening for other nodes' changes failed" in log,
                             "the listening connection breaking")
        cluster.resume()
        b.listening(times=2)

        def delivered():  # a pooled connection broken by the restart fails once (451)
            try:
                a.deliver(7)
                return True
            except smtplib.SMTPDataError as e:
                assert e.smtp_code == 451, e
                return False

        waitUntil(delivered, 30, "a delivery through node a after the restart")
        line, took = nextUntagged(client, b" EXISTS", time.monotonic())
        assert line == b"* 1 EXISTS"
        assert took < PUSH_DEADLINE, f"EXISTS after {took:.2f}s"


def test_payloads_fit_postgresql_and_name_every_folder_once():
    """A change to many folders (an account removed) is split into payloads under
    PostgreSQL's 8000-byte limit; a node ignores its own, and a malformed one."""
    from twistmail.storage.postgresql import push

    ids = list(range(100000, 103000)) + [100000]
    sent = push.payloads("node1", ids)
    assert len(sent) > 1 and all(len(p.encode()) <= 8000 for p in sent)
    heard = [i for p in sent for i in push.parsePayload("node2", p)]
    assert heard == sorted(set(ids))
    assert push.parsePayload("node1", sent[0]) == []
    assert push.parsePayload("node2", "node1:1,x") == []


def test_a_lost_notification_is_caught_up_by_the_fallback_poll(postgres, tmp_path, monkeypatch):
    """A node that dies between its commit and its notification: the others still see
    the change, at their fallback poll (shortened here from 30 s to 2 s)."""
    from twistmail.storage.postgresql import PostgresStore
    from twistmail.testing import onReactor
    from twistmail.testing.conformance import deliver, openFolder

    monkeypatch.setattr(store, "FALLBACK_INTERVAL", 2.0)
    dsn = postgres.dsn(str(tmp_path))
    schema.upgrade(dsn)
    writer, watcher = PostgresStore(dsn), PostgresStore(dsn)
    try:
        inbox = openFolder(watcher)
        heard: list = []
        onReactor(inbox.addListener, heard.append)
        waitUntil(lambda: watcher._pushing, 10, "the watcher listening")
        monkeypatch.setattr(writer, "_announce", lambda conn, folderIds: None)  # the crash
        deliver(writer, message(1))
        waitUntil(lambda: [c for c in heard if c.added], 10, "the fallback poll's refresh")
        assert [c.added for c in heard if c.added] == [(1,)]
        onReactor(inbox.removeListener, heard.append)  # stops the poll, as a session does
    finally:
        writer.close()
        watcher.close()
