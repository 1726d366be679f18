"""The relay queue in PostgreSQL, end to end: real ``twistd -n twistmail`` nodes sharing one
PostgreSQL (tests/pgproc.py) for mail and queue, DNS and a receiving SMTP sink on loopback
(tests/relayenv.py), nodes killed with SIGKILL and PostgreSQL restarted under SMTP load.

Every message carries a unique Message-ID; the sink counts what it acknowledged with
250, the database what it stored for the local recipient.  A message that got a 250
must be at the sink and in the mailbox exactly once; one that did not (its node died
during the transaction) at most once.
"""

from __future__ import annotations

import imaplib
import json
import re
import signal
import smtplib
import threading
import time
from collections import Counter

import psycopg
import pytest
import test_queue_cli
from serverproc import ServerProcess, listenerArgs, twistdCommand, waitUntil
from support import addUser, freePort, onReactor
from twisted.internet import defer

from twistmail.storage.postgresql import schema

pytestmark = pytest.mark.e2e

ALICE, CAROL = "alice@example.test", "carol@example.test"
LEASE = 5  # [relay] queue_lease_time of the nodes: how long a dead node's claim lasts
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


net = test_queue_cli.net  # the fixture: a loopback Internet with DNS and an SMTP sink


class Node:
    """One twistd on a data directory of its own, mail and queue in the shared database."""

    def __init__(self, tmp_path, net, dsn: str, name: str) -> None:
        self.dataDir = str(tmp_path / name)
        self.logPath = str(tmp_path / f"{name}.log")
        addUser(self.dataDir, ALICE)
        addUser(self.dataDir, CAROL)
        relay = net.relayConfig(queue="postgresql", queue_lease_time=LEASE)
        self.config = tmp_path / f"{name}.toml"
        self.config.write_text("\n".join(
            ["[storage]", 'backend = "postgresql"', "[storage.postgresql]",
             f"dsn = {json.dumps(dsn)}", "connect_timeout = 2", "[relay]"]
            + [f"{k} = {json.dumps(v)}" for k, v in relay.items()]) + "\n")
        self.process: ServerProcess | None = None

    def start(self) -> Node:
        self.smtpPort, self.imapPort = freePort(), freePort()
        self.process = ServerProcess(
            twistdCommand("--config", str(self.config), "--data-dir", self.dataDir,
                          "--hostname", "mx.example.test",
                          *listenerArgs(self.smtpPort, freePort(), self.imapPort)),
            logPath=self.logPath).start()
        self.process.waitReady(self.smtpPort, None, self.imapPort)
        return self

    def kill(self) -> None:
        self.process.proc.send_signal(signal.SIGKILL)
        self.process.proc.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture
def nodes(tmp_path, net):
    """nodes(dsn, "a", "b") -> [Node]: started; stopped at the end."""
    made = []

    def start(dsn: str, *names: str, started: bool = True) -> list[Node]:
        schema.upgrade(dsn)
        new = [Node(tmp_path, net, dsn, name) for name in names]
        made.extend(new)
        return [n.start() for n in new] if started else new

    yield start
    for node in made:
        node.stop()


def message(tag: str) -> bytes:
    return (f"From: {ALICE}\r\nTo: bob@remote.test, {CAROL}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.test>\r\n\r\nbody of {tag}\r\n").encode()


class Load:
    """Submits messages over SMTP in a thread, round robin over the nodes' ports,
    remembering what got a 250 and what else came back."""

    def __init__(self, ports: list[int], count: int, prefix: str, pause: float = 0.02) -> None:
        self.ports, self.count, self.prefix, self.pause = list(ports), count, prefix, pause
        self.accepted: list[str] = []
        self.refused: list[tuple[str, int, str]] = []  # (tag, code, reply): SMTP errors
        self.unanswered: list[str] = []  # no reply: the node died or was not there
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for i in range(self.count):
            tag = f"{self.prefix}-{i}"
            port = self.ports[i % len(self.ports)]
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.sendmail(ALICE, ["bob@remote.test", CAROL], message(tag))
                self.accepted.append(tag)
            except smtplib.SMTPRecipientsRefused as e:
                for code, reply in e.recipients.values():
                    self.refused.append((tag, code, reply.decode()))
            except smtplib.SMTPResponseException as e:
                self.refused.append((tag, e.smtp_code, e.smtp_error.decode()))
            except (OSError, smtplib.SMTPServerDisconnected):
                self.unanswered.append(tag)
            time.sleep(self.pause)  # a steady stream, not one burst

    def wait(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the SMTP load did not finish"


def _query(dsn: str, sql: str, args=()) -> list:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def stored(dsn: str) -> Counter:
    """Message-IDs in carol's mailbox (the postgresql store), counted."""
    rows = _query(dsn, "SELECT c.data FROM messages m JOIN folders f ON f.id = m.folder_id "
                  "JOIN accounts a ON a.id = f.account_id JOIN body_chunks c ON "
                  "c.body_id = m.body_id AND c.seq = 0 WHERE a.name = %s", (CAROL,))
    return Counter(MESSAGE_ID.search(bytes(r[0])).group(1).decode() for r in rows)


def sent(net) -> Counter:
    """Message-IDs the sink acknowledged with 250, counted."""
    return Counter(MESSAGE_ID.search(m.data).group(1).decode() for m in net.sink.messages)


def queued(dsn: str) -> int:
    return _query(dsn, "SELECT count(*) FROM relay_queue")[0][0]


def queuedMessageIds(dsn: str) -> set[str]:
    rows = _query(dsn, "SELECT data FROM relay_chunks WHERE seq = 0")
    return {MESSAGE_ID.search(bytes(r[0])).group(1).decode() for r in rows}


def assertExactlyOnce(load: Load, net, dsn: str, *more: Load) -> None:
    """Every accepted message at the sink and in the mailbox once; nothing twice."""
    tags = {f"{t}@example.test" for one in (load, *more) for t in one.accepted}
    waitUntil(lambda: tags <= set(sent(net)) and queued(dsn) == 0, 90,
              "every accepted message at the sink and the queue empty")
    atSink, inMailbox = sent(net), stored(dsn)
    assert {t for t, n in atSink.items() if n > 1} == set(), "delivered twice"
    assert {t for t, n in inMailbox.items() if n > 1} == set(), "stored twice"
    assert tags <= set(inMailbox), "a message that got a 250 is missing from the mailbox"


def test_two_nodes_delivering_one_queue_never_send_a_message_twice(postgres, tmp_path, net,
                                                                    nodes):
    """(3) Both nodes accept and both deliver: each message reaches the sink once."""
    dsn = postgres.dsn(str(tmp_path))
    a, b = nodes(dsn, "a", "b")
    load = Load([a.smtpPort, b.smtpPort], 40, "two", pause=0)
    load.wait()
    assert len(load.accepted) == 40, (load.refused, load.unanswered)
    assertExactlyOnce(load, net, dsn)
    logs = a.process.log + b.process.log
    assert logs.count("result=sent") >= 40


def test_a_node_killed_mid_delivery_loses_its_message_to_the_other_after_the_lease(
        postgres, tmp_path, net, nodes):
    """(4) Node a holds the message, the receiver has its data but has not answered; a
    dies; b takes the message once a's lease ran out, and it arrives once."""
    dsn = postgres.dsn(str(tmp_path))
    a, b = nodes(dsn, "a", "b", started=False)
    a.start()
    held = defer.Deferred()
    net.sink.script.hold = held  # receive DATA, do not answer it yet
    load = Load([a.smtpPort], 1, "killed")
    load.wait()
    assert load.accepted == ["killed-0"]
    waitUntil(lambda: net.sink.dataSeen, 15, "the data at the receiver")
    [(holder, leaseUntil)] = _query(dsn, "SELECT claimed_by, lease_until FROM relay_queue")
    assert holder.split(":")[1] == str(a.process.proc.pid)
    a.kill()
    killed = time.time()
    net.sink.script.hold = None
    onReactor(lambda: held.callback(None))  # a's connection is gone: nothing acknowledged
    b.start()
    waitUntil(lambda: net.sink.messages, 30, "delivery by the other node")
    assert time.time() >= leaseUntil - 1 and time.time() - killed <= LEASE + 15
    assertExactlyOnce(load, net, dsn)
    assert "result=sent" in b.process.log


def test_a_node_killed_under_smtp_load_loses_no_message_and_doubles_none(
        postgres, tmp_path, net, nodes):
    """(1) SMTP load on two nodes; one is killed with SIGKILL while deliveries are in
    flight.  Every message that got a 250 is delivered and stored exactly once."""
    dsn = postgres.dsn(str(tmp_path))
    a, b = nodes(dsn, "a", "b")
    load = Load([a.smtpPort, b.smtpPort], 60, "load", pause=0.05)
    waitUntil(lambda: len(net.sink.messages) >= 10, 60, "deliveries under way")
    held = defer.Deferred()
    net.sink.script.hold = held  # deliveries in flight from here on are not acknowledged
    # Kill only once every acknowledged delivery was recorded (the receiver's 250 and
    # the node's record of it are never atomic: a node dying between them sends again).
    waitUntil(lambda: not (queuedMessageIds(dsn) & set(sent(net))) and
              len(net.sink.dataSeen) > len(net.sink.messages), 30,
              "acknowledged deliveries recorded and one held")
    a.kill()
    net.sink.script.hold = None
    onReactor(lambda: held.callback(None))
    load.wait()
    assert len(load.accepted) >= 30 and not load.refused, load.refused
    assertExactlyOnce(load, net, dsn)
    for tag in load.unanswered:  # no reply: at most once
        assert sent(net)[f"{tag}@example.test"] <= 1


def test_postgresql_restarted_under_smtp_load(tmp_path, net, nodes):
    """(2) The database stops and starts again under SMTP load: clients get only 451
    (IMAP NO) meanwhile, nothing is lost or doubled, and the nodes recover by themselves."""
    from pgproc import PostgresProcess

    with PostgresProcess() as cluster:
        dsn = cluster.dsn("restart")
        a, b = nodes(dsn, "a", "b")
        load = Load([a.smtpPort, b.smtpPort], 80, "restart", pause=0.05)
        waitUntil(lambda: len(load.accepted) >= 10, 60, "mail accepted")
        cluster.pause()
        waitUntil(lambda: load.refused, 30, "a temporary error while the database is down")
        imap = imaplib.IMAP4("127.0.0.1", a.imapPort)
        imap.login(CAROL, "secret")
        status, _ = imap.select("INBOX")
        assert status == "NO"
        imap.logout()
        cluster.resume()
        load.wait()
        assert {code for _, code, _ in load.refused} == {451}, load.refused
        assert all("4.3.0" in reply for _, _, reply in load.refused), load.refused
        assert not load.unanswered
        # After the restart every message is accepted again: the nodes recovered alone.
        after = Load([a.smtpPort, b.smtpPort], 10, "after")
        after.wait()
        assert len(after.accepted) == 10, (after.refused, after.unanswered)
        assertExactlyOnce(load, net, dsn, after)
