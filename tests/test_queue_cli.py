"""``twistmail queue list|show|flush|delete`` against a running server, and without one."""

from __future__ import annotations

import json
import os
import smtplib
import time

import pytest
from relayenv import Internet, queueIds
from serverproc import waitUntil
from support import addUser, cli, startServer

ALICE = "alice@example.test"
MESSAGE = b"From: alice@example.test\r\nSubject: waiting\r\n\r\nbody\r\n"


@pytest.fixture
def net():
    internet = Internet()
    yield internet
    internet.stop()


@pytest.fixture
def server(net, dataDir):
    """A relay whose retries are an hour apart: only a flush makes it try again soon."""
    addUser(dataDir, ALICE)
    srv = startServer(dataDir, relay=net.relayConfig(retry_min=3600, retry_max=3600))
    yield srv
    srv.stop()


def queued(server, net, rcpt="bob@remote.test") -> str:
    """Submit while the receiver answers 451, and wait for that first attempt."""
    net.sink.script.rcpt = lambda r: "451 4.7.1 greylisted"
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as client:
        client.ehlo("client.example.test")
        client.mail(ALICE)
        client.rcpt(rcpt)
        code, reply = client.data(MESSAGE)
    queueId = reply.decode().split()[-1]
    path = os.path.join(server.dataDir, "queue", queueId + ".json")

    def attempted():
        with open(path) as f:
            return json.load(f)["recipients"][0]["attempts"] == 1

    waitUntil(attempted, 15, "the first, deferred attempt")
    return queueId


def rows(output: str) -> list[list[str]]:
    return [line.split(None, 5) for line in output.splitlines()[1:-1]]


def test_list_shows_id_sender_recipients_attempts_next_attempt_and_last_error(server, net):
    queueId = queued(server, net)
    out = cli("queue", "list", dataDir=server.dataDir).stdout
    assert out.splitlines()[0].split() == ["ID", "SENDER", "RECIPIENTS", "ATTEMPTS",
                                           "NEXT-ATTEMPT", "LAST-ERROR"]
    [row] = rows(out)
    assert row[:4] == [queueId, f"<{ALICE}>", "bob@remote.test", "1"]
    next_ = time.mktime(time.strptime(row[4], "%Y-%m-%dT%H:%M:%S"))
    assert 3500 < next_ - time.time() <= 3600
    assert row[5] == "451 4.7.1 greylisted"
    assert out.splitlines()[-1] == "1 message queued"


def test_show_prints_envelope_recipients_and_headers(server, net):
    queueId = queued(server, net)
    out = cli("queue", "show", queueId, dataDir=server.dataDir).stdout
    assert f"id:        {queueId}" in out and f"sender:    <{ALICE}>" in out
    assert "via smtp from 127.0.0.1" in out
    assert "bob@remote.test  queued  1" in out and "451 4.7.1 greylisted" in out
    assert "Subject: waiting" in out and "body" not in out.split("Subject: waiting")[1]


def test_flush_makes_the_running_server_retry_now(server, net):
    queueId = queued(server, net)
    net.sink.script.rcpt = lambda r: None  # the receiver recovered; the next retry is in an hour
    out = cli("queue", "flush", queueId, dataDir=server.dataDir).stdout
    assert "flush requested" in out
    waitUntil(lambda: net.sink.messages, 10, "delivery after the flush")
    waitUntil(lambda: not queueIds(server.dataDir), 10, "the queue to empty")


def test_flush_all(server, net):
    first = queued(server, net)
    second = queued(server, net, "carol@backup.test")
    assert sorted(queueIds(server.dataDir)) == sorted([first, second])
    net.sink.script.rcpt = lambda r: None
    assert "every message" in cli("queue", "flush", dataDir=server.dataDir).stdout
    waitUntil(lambda: len(net.sink.messages) == 2, 10, "both delivered after the flush")


def test_delete_removes_without_delivering(server, net):
    queueId = queued(server, net)
    net.sink.script.rcpt = lambda r: None
    assert cli("queue", "delete", queueId, dataDir=server.dataDir).stdout.strip() == \
        f"message {queueId} deleted"
    assert queueIds(server.dataDir) == []
    cli("queue", "flush", dataDir=server.dataDir)
    assert net.sink.messages == []


def test_unknown_id_is_a_one_line_error(server):
    for action in ("show", "flush", "delete"):
        proc = cli("queue", action, "0123456789ABCDEF", dataDir=server.dataDir, check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip() == \
            "twistmail: error: no queue entry 0123456789ABCDEF (see: twistmail queue list)"
    proc = cli("queue", "show", "../accounts", dataDir=server.dataDir, check=False)
    assert proc.returncode == 1 and "is not a queue id" in proc.stderr


def test_without_a_server_flush_and_delete_edit_the_queue_directly(net, dataDir):
    addUser(dataDir, ALICE)
    ids = [cli("sendmail", "-v", "-f", ALICE, f"u{i}@remote.test", dataDir=dataDir,
               stdin="Subject: offline\n\nx\n").stdout.split()[-1] for i in range(2)]
    assert "not running" in cli("queue", "flush", dataDir=dataDir).stdout
    assert cli("queue", "delete", ids[0], dataDir=dataDir).stdout.strip() == \
        f"message {ids[0]} deleted"
    assert queueIds(dataDir) == [ids[1]]
    [row] = rows(cli("queue", "list", dataDir=dataDir).stdout)
    assert row[0] == ids[1] and row[4] == "now"
