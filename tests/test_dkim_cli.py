"""``twistmail dkim`` makes, lists and removes keys; ``twistmail sendmail`` and bounces
are signed with them."""

from __future__ import annotations

import os
import re
import stat

import dkim
import pytest
from relayenv import Internet, queueIds
from serverproc import waitUntil
from support import addUser, cli, maildirFiles, startServer
from test_relay_e2e import submit
from test_relay_runner import ALICE, World, sync

from twistmail import dkimkeys
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer
from twistmail.relay.queue import FAILED
from twistmail.relay.runner import QueueRunner
from twistmail.relay.sender import Result


def publishedBy(dataDir: str):
    """dkimpy's key lookup answered from the key files (the DNS side is in test_dkimsign)."""
    records = {owner: text.encode() for domain in dkimkeys.listDomains(dataDir)
               for keys in dkimkeys.listSets(dataDir, domain) for owner, text in keys.records()}

    def dnsfunc(name, timeout=5):
        return records.get(name.decode().rstrip("."), b"")

    return dnsfunc


def test_generate_writes_private_keys_0600_and_prints_the_records(dataDir):
    out = cli("dkim", "generate", "Example.TEST", "--selector", "s1", dataDir=dataDir).stdout
    assert "key set s1 for example.test made (selectors s1-ed25519 and s1-rsa)" in out
    assert "It signs mail from now on" in out
    assert 's1-ed25519._domainkey.example.test. IN TXT "v=DKIM1; k=ed25519; p=' in out
    rsa = [line for line in out.splitlines() if line.startswith("s1-rsa._domainkey")]
    assert len(rsa) == 1 and '" "' in rsa[0]  # over 255 octets: split into strings
    directory = os.path.join(dataDir, "dkim", "example.test", "s1")
    for name in ("ed25519.pem", "rsa.pem"):
        assert stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_list_rotation_and_remove(dataDir):
    cli("dkim", "generate", "example.test", "--selector", "old", dataDir=dataDir)
    second = cli("dkim", "generate", "example.test", "--selector", "new", dataDir=dataDir).stdout
    assert "old keeps signing" in second and "twistmail dkim remove example.test old" in second
    third = cli("dkim", "generate", "example.test", "--selector", "x", dataDir=dataDir,
                check=False)
    assert third.returncode == 1
    assert "remove the older one first: twistmail dkim remove example.test old" in third.stderr
    listed = cli("dkim", "list", dataDir=dataDir).stdout.splitlines()
    assert listed[0].split() == ["DOMAIN", "SELECTOR", "ALGORITHM", "CREATED", "(UTC)", "STATE"]
    assert [(r.split()[1], r.split()[-1]) for r in listed[1:]] == [
        ("old-ed25519", "signing"), ("old-rsa", "signing"),
        ("new-ed25519", "next"), ("new-rsa", "next")]
    out = cli("dkim", "remove", "example.test", "old", dataDir=dataDir).stdout
    assert out.strip() == "key set old removed; new signs now"
    out = cli("dkim", "remove", "example.test", "new", dataDir=dataDir).stdout
    assert "example.test has no keys: its mail goes out unsigned" in out
    assert not os.path.exists(os.path.join(dataDir, "dkim", "example.test"))


@pytest.mark.parametrize("args, message", [
    (("generate", "../etc"), "is not a domain name"),
    (("generate", "example.test/../../x"), "is not a domain name"),
    (("generate", "localhost"), "is not a domain name"),
    (("generate", "example.test", "--selector", "../x"), "is not a selector"),
    (("generate", "example.test", "--selector", "a.b"), "is not a selector"),
    (("remove", "example.test", "nosuch"), "example.test has no selector nosuch"),
])
def test_bad_names_are_refused(dataDir, args, message):
    proc = cli("dkim", *args, dataDir=dataDir, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(dataDir), "etc"))


def test_sendmail_signs_what_it_queues(dataDir):
    dkimkeys.generate(dataDir, "example.test", "s1")
    cli("sendmail", "-f", ALICE, "bob@remote.test", dataDir=dataDir,
        stdin=f"From: Alice <{ALICE}>\nSubject: cron\n\nhello\n")
    [id] = queueIds(dataDir)
    with open(os.path.join(dataDir, "queue", f"{id}.eml"), "rb") as f:
        queued = f.read()
    assert queued.count(b"DKIM-Signature:") == 2
    # Signed over what sendmail added (Date, Message-ID) and as the wire carries it (CRLF).
    wire = queued.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    d = dkim.DKIM(wire)
    assert [d.verify(idx=i, dnsfunc=publishedBy(dataDir)) for i in (0, 1)] == [True, True]
    signedFields = re.search(rb"h=([^;]*);", re.sub(rb"\s", b"", wire)).group(1).split(b":")
    assert sorted(signedFields) == [b"date", b"from", b"from", b"message-id", b"subject"]


class SigningWorld(World):
    def newRunner(self) -> QueueRunner:
        plain = super().newRunner()
        plain.stopService()
        runner = QueueRunner(plain._queue, plain._router, plain._local, self.destination,
                             self.sender, self.settings, self.clock,
                             sign=Signer(KeyRing(self.dataDir), run=sync).signLater)
        runner.startService()
        return runner


def test_bounces_are_signed_for_the_host_name_domain(dataDir):
    dkimkeys.generate(dataDir, "example.test", "s1")  # MAILER-DAEMON@mx.example.test
    w = SigningWorld(dataDir)
    w.sender.reply = lambda call: {r: Result(FAILED, "550 5.1.1 no such user", "mx.remote.test")
                                   for r in call.recipients}
    w.enqueue(["gone@remote.test"])
    w.clock.advance(0)
    [name] = os.listdir(os.path.join(dataDir, "mail", "example.test", "alice", "new"))
    with open(os.path.join(dataDir, "mail", "example.test", "alice", "new", name), "rb") as f:
        stored = f.read()
    d = dkim.DKIM(stored[stored.index(b"DKIM-Signature:"):])  # after our Received:
    assert [d.verify(idx=i, dnsfunc=publishedBy(dataDir)) for i in (0, 1)] == [True, True]


def test_a_running_server_signs_bounces_with_keys_made_after_it_started(dataDir):
    """The composition tap.makeService builds: keys generated while the server runs are
    used for its next bounce, without a restart."""
    internet = Internet()
    addUser(dataDir, ALICE)
    server = startServer(dataDir, relay=internet.relayConfig(retry_min=3600, retry_max=3600))
    try:
        cli("dkim", "generate", "example.test", "--selector", "s1", dataDir=dataDir)
        submit(server.smtpPort, ["someone@nomail.test"])  # null MX: bounced at once
        [name] = waitUntil(lambda: maildirFiles(dataDir, ALICE), 20, "the bounce")
    finally:
        server.stop()
        internet.stop()
    with open(os.path.join(dataDir, "mail", "example.test", "alice", "new", name), "rb") as f:
        stored = f.read()
    d = dkim.DKIM(stored[stored.index(b"DKIM-Signature:"):])
    assert [d.verify(idx=i, dnsfunc=publishedBy(dataDir)) for i in (0, 1)] == [True, True]


def test_tls_reports_are_signed(dataDir, tmp_path):
    from test_tlsrpt import RECORD, FakeQueue, FakeResolver, _pastReports
    from twisted.internet import task

    from twistmail.relay.tlsrptservice import ReportMailer

    dkimkeys.generate(dataDir, "relay.test", "s1")  # From: postmaster@relay.test
    directory = str(tmp_path / "tlsrpt")
    clock = task.Clock()
    clock.advance(3 * 86400 + 5)
    _pastReports(directory, ["example.test"], clock)
    queue = FakeQueue()
    ReportMailer(directory, "relay.test", FakeResolver(RECORD), queue, run=sync,
                 now=clock.seconds, sign=Signer(KeyRing(dataDir), run=sync).signLater).mailDue()
    [(_, _, data, _)] = queue.queued
    d = dkim.DKIM(data)
    assert [d.verify(idx=i, dnsfunc=publishedBy(dataDir)) for i in (0, 1)] == [True, True]


def test_a_broken_key_file_is_named_with_the_fix(dataDir):
    dkimkeys.generate(dataDir, "example.test", "s1")
    path = os.path.join(dataDir, "dkim", "example.test", "s1", "rsa.pem")
    with open(path, "w") as f:
        f.write("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    for args in (("dkim", "list"), ("dns", "example.test")):
        proc = cli(*args, dataDir=dataDir, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"{path} is not an unencrypted rsa private key in PEM; run twistmail dkim " \
               "remove example.test s1, then generate a new set" in proc.stderr
