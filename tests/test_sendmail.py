"""``twistmail sendmail``: local programs submit mail the Unix way, with or without a running server."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import socket
import tempfile

import pytest
from relayenv import Internet, mailbox, queueIds
from serverproc import waitUntil
from support import addUser, cli, startServer

ALICE = "alice@example.test"
HOST = socket.getfqdn()  # the CLI's [server] hostname without a config file


@pytest.fixture
def net():
    internet = Internet()
    yield internet
    internet.stop()


@pytest.fixture
def relay(net, dataDir):
    addUser(dataDir, ALICE)
    server = startServer(dataDir, relay=net.relayConfig(trusted_networks=[]))
    yield server
    server.stop()


def sendmail(dataDir, *args, stdin, check=True):
    return cli("sendmail", *args, dataDir=dataDir, stdin=stdin, check=check)


def delivered(net, count=1):
    return waitUntil(lambda: len(net.sink.messages) >= count and net.sink.messages, 15,
                     "delivery to the receiving server")


def parsed(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def test_queues_and_the_running_server_delivers(net, relay, dataDir):
    proc = sendmail(dataDir, "-f", ALICE, "bob@remote.test",
                    stdin="Subject: from cron\n\nline one\n..double dot\nlast\n")
    assert proc.stdout == "" and proc.stderr == ""  # silent, as sendmail is
    [got] = delivered(net)
    assert got.sender == ALICE and got.recipients == ["bob@remote.test"]
    head, _, text = got.data.partition(b"\r\n\r\n")
    assert text == b"line one\r\n..double dot\r\nlast\r\n"  # CRLF on the wire, dots intact
    message = parsed(got.data)
    assert message["Subject"] == "from cron"
    assert message["From"] == ALICE and message["Date"] and message["Message-ID"]
    assert f"by {HOST} (twistmail sendmail, from ".encode() in head
    waitUntil(lambda: not queueIds(dataDir), 10, "the queue to empty")


def test_t_takes_recipients_from_the_headers_and_removes_bcc(net, relay, dataDir):
    sendmail(dataDir, "-t", "-i", "-f", ALICE, "extra@remote.test", stdin=(
        "From: Alice <alice@example.test>\nTo: Bob <bob@remote.test>, carol@remote.test\n"
        "Cc: dave@backup.test\nBcc: eve@remote.test,\n  frank@remote.test\nSubject: t\n\nhi\n"))
    messages = delivered(net, 2)
    rcpts = sorted(r for m in messages for r in m.recipients)
    assert rcpts == ["bob@remote.test", "carol@remote.test", "dave@backup.test",
                     "eve@remote.test", "extra@remote.test", "frank@remote.test"]
    for m in messages:
        assert b"Bcc" not in m.data and b"eve@" not in m.data
        assert parsed(m.data)["From"] == "Alice <alice@example.test>"  # kept as given


@pytest.mark.parametrize("flags, expected", [
    ([], b"before\r\n"),
    (["-i"], b"before\r\n.\r\nafter\r\n"),
    (["-oi"], b"before\r\n.\r\nafter\r\n"),
])
def test_a_lone_dot_ends_input_unless_i(net, relay, dataDir, flags, expected):
    sendmail(dataDir, *flags, "-f", ALICE, "bob@remote.test", stdin="Subject: d\n\nbefore\n.\nafter\n")
    [got] = delivered(net)
    assert got.data.partition(b"\r\n\r\n")[2] == expected


def test_cron_and_mutt_flags_and_bare_local_names(net, relay, dataDir):
    # Debian cron: sendmail -FCronDaemon -i -B8BITMIME -oem <user>
    with relay.accounts.editing() as accounts:
        accounts.addDomain(HOST)
        accounts.addAlias(f"root@{HOST}", [ALICE])
    sendmail(dataDir, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-odi", "--", "root",
             stdin="Subject: Cron <root@host> true\n\noutput\n")
    [message] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "local delivery through the queue")
    assert message["Subject"] == "Cron <root@host> true"
    assert message["From"].addresses[0].display_name == "CronDaemon"


def test_local_recipient_null_sender(net, relay, dataDir):
    sendmail(dataDir, "-f", "<>", ALICE, stdin="Subject: vacation reply\n\naway\n")
    [message] = waitUntil(lambda: mailbox(dataDir, ALICE), 15, "local delivery")
    assert message["Subject"] == "vacation reply"


@pytest.mark.parametrize("args, status, text", [
    ([], 64, "no recipients"),
    (["-t"], 64, "no recipients"),
    (["not an address@@"], 65, "not a mail address"),
    (["-bp", "bob@remote.test"], 64, "-bp is not supported"),
])
def test_usage_errors_name_the_problem(dataDir, args, status, text):
    proc = sendmail(dataDir, *args, stdin="Subject: x\n\ny\n", check=False)
    assert proc.returncode == status
    assert text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert queueIds(dataDir) == []


def test_without_a_server_mail_waits_in_the_queue(net, dataDir):
    addUser(dataDir, ALICE)
    proc = sendmail(dataDir, "-v", "-f", ALICE, "bob@remote.test", stdin="Subject: later\n\nx\n")
    queueId = proc.stdout.split()[-1]
    assert queueIds(dataDir) == [queueId]
    assert os.path.exists(os.path.join(dataDir, "queue", "control", queueId + ".new"))
    server = startServer(dataDir, relay=net.relayConfig())
    try:
        [got] = delivered(net)
        assert parsed(got.data)["Subject"] == "later"
        waitUntil(lambda: not queueIds(dataDir), 10, "the queue to empty")
        waitUntil(lambda: not os.listdir(os.path.join(dataDir, "queue", "control")), 10,
                  "the request to be handled")
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as CI has")
def test_run_by_root_the_files_belong_to_the_servers_user():
    # Root acts as the data directory's owner (twistmail.ownership), who must be able to
    # reach it: not under pytest's root-only tmp_path.
    base = tempfile.mkdtemp(prefix="twistmail-sendmail-", dir="/var/tmp")
    os.chmod(base, 0o755)
    dataDir = os.path.join(base, "data")
    os.mkdir(dataDir, 0o700)
    os.chown(dataDir, 65534, 65534)  # the server would run as nobody
    try:
        proc = sendmail(dataDir, "-v", "-f", ALICE, "bob@remote.test", stdin="Subject: r\n\nx\n")
        queueId = proc.stdout.split()[-1]
        queueDir = os.path.join(dataDir, "queue")
        for path in (queueDir, os.path.join(queueDir, ".lock"), os.path.join(queueDir, "control"),
                     os.path.join(queueDir, queueId + ".eml"), os.path.join(queueDir, queueId + ".json"),
                     os.path.join(queueDir, "control", queueId + ".new")):
            assert os.stat(path).st_uid == 65534, path
    finally:
        shutil.rmtree(base, ignore_errors=True)
