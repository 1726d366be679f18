"""Relaying end to end: the server makeService builds, a DNS server and receiving SMTP servers
on loopback, and a real twistd killed with SIGKILL mid-delivery.

Mail is submitted with smtplib from 127.0.0.1, which these servers trust
(``[relay] trusted_networks``); the sender alice@example.test is a local
user, so bounces land in her Maildir.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib

import pytest
from relayenv import Internet, dsnRecipients, mailbox, queueIds
from serverproc import ServerProcess, listenerArgs, twistdCommand, waitUntil
from support import addUser, freePort, onReactor, startServer
from twisted.internet import defer

ALICE = "alice@example.test"
MESSAGE = (b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: outbound\r\n"
           b"Message-ID: <outbound-1@example.test>\r\n\r\nHello from the relay.\r\n"
           b".a line starting with a dot\r\n")


@pytest.fixture
def net():
    internet = Internet()
    yield internet
    internet.stop()


@pytest.fixture
def relay(net, dataDir):
    """Start a relay with [relay] overrides: relay(**overrides) -> RunningServer."""
    servers = []

    def start(**overrides):
        addUser(dataDir, ALICE)
        server = startServer(dataDir, relay=net.relayConfig(**overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def submit(port, recipients, message=MESSAGE, sender=ALICE) -> str:
    """Send over SMTP from 127.0.0.1; the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.test")
        client.mail(sender)
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, (rcpt, code, reply)
        code, reply = client.data(message)
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def body(data: bytes) -> bytes:
    """The message after our Received: header."""
    assert data.startswith(b"Received: from client.example.test ([127.0.0.1])\r\n")
    lines = data.split(b"\r\n")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def wait(condition, what, timeout=15):
    return waitUntil(condition, timeout, what)


def test_trusted_client_relays_to_the_mx(net, relay, dataDir):
    server = relay()
    queueId = submit(server.smtpPort, ["bob@remote.test", "carol@remote.test"])
    wait(lambda: net.sink.messages, "delivery to mx.remote.test")
    [got] = net.sink.messages
    assert got.sender == ALICE and got.recipients == ["bob@remote.test", "carol@remote.test"]
    assert body(got.data) == MESSAGE  # one transaction, the exact bytes, our trace header on top
    assert f"by mx.example.test (twistmail) with ESMTP id {queueId}".encode() in got.data
    wait(lambda: not queueIds(dataDir), "the queue to empty")
    assert ("C", "EHLO mx.example.test") in net.sink.transcript


def test_untrusted_client_still_may_not_relay(net, relay):
    server = relay(trusted_networks=["192.0.2.0/24"])
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as client:
        client.ehlo("client.example.test")
        client.mail(ALICE)
        code, reply = client.rcpt("bob@remote.test")
    assert (code, reply[:5]) == (550, b"5.7.1")


def test_local_and_remote_recipients_in_one_transaction(net, relay, dataDir):
    server = relay()
    submit(server.smtpPort, [ALICE, "bob@remote.test"])
    assert len(mailbox(dataDir, ALICE)) == 1  # local copy written before the 250
    wait(lambda: net.sink.messages, "the remote copy")
    assert net.sink.messages[0].recipients == ["bob@remote.test"]


def test_queued_durably_before_the_250(net, relay, dataDir):
    server = relay()
    queueId = submit(server.smtpPort, ["x@broken.test"])  # SERVFAIL: stays queued
    path = os.path.join(dataDir, "queue", queueId)
    with open(path + ".json") as f:
        assert [r["address"] for r in json.load(f)["recipients"]] == ["x@broken.test"]
    with open(path + ".eml", "rb") as f:
        assert body(f.read()) == MESSAGE


def test_deferred_on_4xx_and_delivered_after_the_receiver_recovers(net, relay, dataDir):
    net.sink.script.rcpt = lambda rcpt: "451 4.3.0 greylisted, try again later"
    server = relay(retry_min=1, retry_max=1)
    queueId = submit(server.smtpPort, ["bob@remote.test"])

    def attempts():
        try:
            with open(os.path.join(dataDir, "queue", queueId + ".json")) as f:
                return json.load(f)["recipients"][0]["attempts"]
        except FileNotFoundError:
            return 0

    wait(lambda: attempts() >= 2, "two deferred attempts")
    with open(os.path.join(dataDir, "queue", queueId + ".json")) as f:
        assert json.load(f)["recipients"][0]["last_reply"] == "451 4.3.0 greylisted, try again later"
    assert net.sink.messages == [] and mailbox(dataDir, ALICE) == []
    net.sink.script.rcpt = lambda rcpt: None  # the receiver recovers
    wait(lambda: net.sink.messages, "delivery after recovery")
    wait(lambda: not queueIds(dataDir), "the queue to empty")
    assert mailbox(dataDir, ALICE) == []  # no bounce


def test_5xx_bounces_at_once_with_a_dsn_in_the_senders_mailbox(net, relay, dataDir):
    net.sink.script.rcpt = lambda rcpt: "550 5.1.1 <nobody@remote.test>: no such user" \
        if rcpt.startswith("nobody") else None
    server = relay(retry_min=3600, retry_max=3600)
    queueId = submit(server.smtpPort, ["nobody@remote.test", "bob@remote.test"])
    [dsn] = wait(lambda: mailbox(dataDir, ALICE), "the bounce")
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.test"
    [failed] = dsnRecipients(dsn)
    assert failed == {"Final-Recipient": "rfc822; nobody@remote.test", "Action": "failed",
                      "Status": "5.1.1", "Remote-MTA": "dns; mx.remote.test",
                      "Diagnostic-Code": "smtp; 550 5.1.1 <nobody@remote.test>: no such user",
                      "Last-Attempt-Date": failed["Last-Attempt-Date"]}
    headers = [p for p in dsn.iter_parts() if p.get_content_type() == "text/rfc822-headers"][0]
    assert "Message-ID: <outbound-1@example.test>" in headers.get_content()
    assert "Hello from the relay" not in headers.get_content()
    assert net.sink.messages[0].recipients == ["bob@remote.test"]
    wait(lambda: queueId not in queueIds(dataDir), "the message to leave the queue")


def test_expired_after_the_queue_lifetime_with_a_dsn(net, relay, dataDir):
    server = relay(retry_min=1, retry_max=1, max_queue_lifetime=3)
    submit(server.smtpPort, ["bob@dead.test"])  # its only MX refuses connections
    [dsn] = wait(lambda: mailbox(dataDir, ALICE), "the expiry bounce", timeout=20)
    [failed] = dsnRecipients(dsn)
    assert failed["Final-Recipient"] == "rfc822; bob@dead.test"
    assert failed["Action"] == "failed" and failed["Status"] == "4.4.7"
    assert "Connection refused" in failed["Diagnostic-Code"]
    assert "maximum time in the queue" in dsn.get_body(("plain",)).get_content()
    wait(lambda: not queueIds(dataDir), "the queue to empty")


def test_null_mx_bounces_at_once(net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    submit(server.smtpPort, ["someone@nomail.test"])
    [dsn] = wait(lambda: mailbox(dataDir, ALICE), "the null-MX bounce")
    [failed] = dsnRecipients(dsn)
    assert failed["Status"] == "5.1.10" and "null MX" in failed["Diagnostic-Code"]
    assert net.sink.connections == 0


def test_nxdomain_bounces_at_once(net, relay, dataDir):
    server = relay(retry_min=3600, retry_max=3600)
    submit(server.smtpPort, ["someone@no-such-domain.test"])
    [dsn] = wait(lambda: mailbox(dataDir, ALICE), "the NXDOMAIN bounce")
    assert dsnRecipients(dsn)[0]["Status"] == "5.1.2"


def test_lower_preference_mx_is_used_when_the_first_is_down(net, relay, dataDir):
    server = relay()
    submit(server.smtpPort, ["bob@backup.test"])  # mx1 (127.0.0.2) refuses connections
    [got] = wait(lambda: net.sink.messages, "delivery through mx2.backup.test")
    assert got.local == "127.0.0.3" and got.recipients == ["bob@backup.test"]
    wait(lambda: not queueIds(dataDir), "the queue to empty")


def test_ipv6_then_ipv4_addresses_are_tried(net, relay, dataDir):
    from twisted.logger import globalLogPublisher

    events = []
    onReactor(globalLogPublisher.addObserver, events.append)
    try:
        server = relay()
        submit(server.smtpPort, ["bob@v6.test"])  # AAAA ::1 (nothing listens), then A 127.0.0.1
        [got] = wait(lambda: net.sink.messages, "delivery over IPv4 after IPv6 was refused")

        def attempts():
            return [(e["mx"], e["result"]) for e in list(events)
                    if e.get("log_format", "").startswith("relay id=") and e.get("domain") == "v6.test"]

        # The sink has the message before the relay has read its 250 and logged "sent".
        wait(lambda: len(attempts()) == 2, "the relay to log both attempts")
    finally:
        onReactor(globalLogPublisher.removeObserver, events.append)
    assert got.local == "127.0.0.1"
    assert attempts() == [(f"mx.v6.test[::1]:{net.port}", "deferred"),
                        (f"mx.v6.test[127.0.0.1]:{net.port}", "sent")]


def test_bounce_for_the_null_sender_is_never_sent(net, relay, dataDir):
    net.sink.script.rcpt = lambda rcpt: "550 5.1.1 no such user"
    server = relay()
    submit(server.smtpPort, ["nobody@remote.test"], sender="")
    wait(lambda: not queueIds(dataDir), "the failed message to leave the queue")
    assert mailbox(dataDir, ALICE) == [] and net.sink.messages == []


# -- a real twistd, killed mid-delivery --------------------------------------------


def writeConfig(tmp_path, net, **relay) -> str:
    settings = net.relayConfig(**relay)
    lines = ["[relay]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = tmp_path / "twistmail.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def launch(tmp_path, dataDir, config, name):
    smtpPort, pop3Port = freePort(), freePort()
    process = ServerProcess(
        twistdCommand("--config", config, "--data-dir", dataDir, "--hostname", "mx.example.test",
                      *listenerArgs(smtpPort, pop3Port)),
        logPath=str(tmp_path / f"{name}.log"), cwd=str(tmp_path)).start()
    process.waitReady(smtpPort, pop3Port)
    return process, smtpPort


@pytest.mark.e2e
def test_queue_survives_sigkill_mid_delivery_and_is_delivered_once_after_restart(
        net, dataDir, tmp_path):
    addUser(dataDir, ALICE)
    held = defer.Deferred()
    net.sink.script.hold = held  # receive DATA, never answer it
    config = writeConfig(tmp_path, net)
    process, smtpPort = launch(tmp_path, dataDir, config, "first")
    try:
        queueId = submit(smtpPort, ["bob@remote.test"])
        wait(lambda: net.sink.dataSeen, "the message data at the receiver")
        process.proc.send_signal(signal.SIGKILL)
        process.proc.wait(10)
    finally:
        process.stop()
    assert queueIds(dataDir) == [queueId]
    with open(os.path.join(dataDir, "queue", queueId + ".json")) as f:
        state = json.load(f)
    assert state["recipients"][0]["state"] == "queued"
    with open(os.path.join(dataDir, "queue", queueId + ".eml"), "rb") as f:
        assert f.read() == net.sink.dataSeen[0].data
    assert net.sink.messages == []  # the first attempt never got its 250

    net.sink.script.hold = None  # the receiver answers from now on
    onReactor(lambda: held.callback(None))  # (its connection is gone: nothing acknowledged)
    process, _ = launch(tmp_path, dataDir, config, "second")
    try:
        wait(lambda: net.sink.messages, "delivery after the restart")
        wait(lambda: not queueIds(dataDir), "the queue to empty")
        assert len(net.sink.messages) == 1 and net.sink.messages[0].data == net.sink.dataSeen[0].data
        process.waitForLog(lambda log: f"relay id={queueId} domain=remote.test" in log and
                           "result=sent" in log, "the delivery log line")
    finally:
        process.stop()


def test_smarthost_with_auth_over_verified_starttls(net, dataDir, tmp_path):
    from certs import makeCerts
    from smtpsink import Script, startSink

    certs = makeCerts("smarthost.test")
    (tmp_path / "ca.pem").write_bytes(certs.caPEM)
    smarthost = startSink(script=Script(tlsOptions=certs.serverOptions(),
                                        users={"mx@example.test": "relay-Pw-1"}))
    addUser(dataDir, ALICE)
    server = startServer(dataDir, relay=net.relayConfig(
        smarthost=f"smarthost.test:{smarthost.port}", smarthost_username="mx@example.test",
        smarthost_password="relay-Pw-1", smarthost_ca_file=str(tmp_path / "ca.pem")))
    try:
        submit(server.smtpPort, ["bob@remote.test", "someone@nomail.test"])
        messages = wait(lambda: len(smarthost.messages) == 2 and smarthost.messages, "delivery")
        # Everything goes to the smarthost, whatever the domains' MX records say.
        assert sorted(r for m in messages for r in m.recipients) == \
            ["bob@remote.test", "someone@nomail.test"]
        assert all(m.tls and m.user == "mx@example.test" for m in messages)
        assert net.sink.connections == 0
        assert {name for name, _ in net.dns.queries} == {"smarthost.test"}  # no MX lookups
    finally:
        server.stop()
        smarthost.stop()
