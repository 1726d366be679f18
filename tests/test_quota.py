"""Per-user quota (RFC 9208 QUOTA over IMAP; 452 4.2.2 / 552 5.2.2 over SMTP), set with
``twistmail user quota`` or ``[accounts] default_quota``, on every backend."""

from __future__ import annotations

import json
import os
import re
import smtplib

import pytest
from imapwire import loggedIn
from support import addUser, cli, everyBackend, startServer  # noqa: F401 - everyBackend: fixture

ALICE = "alice@example.test"
BOB = "bob@example.test"


def message(size: int) -> bytes:
    head = b"From: a@remote.test\r\nSubject: q\r\n\r\n"
    return head + b"x" * (size - len(head) - 2) + b"\r\n"


def setQuota(dataDir: str, address: str, *args: str) -> str:
    return cli("user", "quota", address, *args, dataDir=dataDir).stdout


@pytest.fixture
def quotaServer(dataDir, backend):
    """alice: 10 KiB and 5 messages; bob: no quota of his own, no default."""
    addUser(dataDir, ALICE)
    addUser(dataDir, BOB)
    setQuota(dataDir, ALICE, "10K", "--messages", "5")
    cli("alias", "add", "solo@example.test", ALICE, dataDir=dataDir)
    cli("alias", "add", "team@example.test", ALICE, BOB, dataDir=dataDir)
    srv = startServer(dataDir, storage={"backend": backend})
    yield srv
    srv.stop()


def quotaOf(imap) -> tuple[list[bytes], bytes]:
    return imap.command("GETQUOTAROOT INBOX")


def test_cli_sets_shows_and_clears_a_quota(dataDir):
    addUser(dataDir, ALICE)
    assert "10240" in setQuota(dataDir, ALICE, "10K", "--messages", "5")
    with open(os.path.join(dataDir, "accounts.json")) as f:
        assert json.load(f)["users"][ALICE]["quota"] == {"storage": 10240, "messages": 5}
    setQuota(dataDir, ALICE, "2M")
    with open(os.path.join(dataDir, "accounts.json")) as f:
        assert json.load(f)["users"][ALICE]["quota"] == {"storage": 2 * 1024 * 1024}
    setQuota(dataDir, ALICE, "default")
    with open(os.path.join(dataDir, "accounts.json")) as f:
        assert "quota" not in json.load(f)["users"][ALICE]
    bad = cli("user", "quota", ALICE, "lots", dataDir=dataDir, check=False)
    assert bad.returncode != 0 and "10M" in bad.stderr  # says how to write it
    bad = cli("user", "quota", "nobody@example.test", "1M", dataDir=dataDir, check=False)
    assert bad.returncode != 0 and "no user" in bad.stderr


def test_getquotaroot_reports_usage_and_limits(quotaServer):
    with loggedIn(quotaServer.imapPort) as imap:
        [line] = imap.ok("CAPABILITY")
        assert {b"QUOTA", b"QUOTA=RES-STORAGE", b"QUOTA=RES-MESSAGE"} <= set(line.split())
        imap.append(message(1500))
        untagged = imap.ok("GETQUOTAROOT INBOX")
        assert untagged == [b'* QUOTAROOT INBOX ""', b'* QUOTA "" (STORAGE 2 10 MESSAGE 1 5)']
        assert imap.ok('GETQUOTA ""') == [b'* QUOTA "" (STORAGE 2 10 MESSAGE 1 5)']
        assert imap.command('GETQUOTA "other"')[1].startswith(b"NO [NONEXISTENT]")
        assert imap.command('SETQUOTA "" (STORAGE 100)')[1].startswith(b"NO")
    with loggedIn(quotaServer.imapPort, BOB) as imap:
        # No quota: no quota root (RFC 9208 §4.1.2).
        assert imap.ok("GETQUOTAROOT INBOX") == [b"* QUOTAROOT INBOX"]


def test_append_copy_and_multiappend_over_quota_are_refused(quotaServer):
    with loggedIn(quotaServer.imapPort) as imap:
        imap.append(message(4000))
        imap.append(message(4000))
        _, tagged = imap.command(b"APPEND INBOX {3000+}\r\n" + message(3000))
        assert tagged.startswith(b"NO [OVERQUOTA]"), tagged
        imap.ok("CREATE Other")
        imap.ok("SELECT INBOX")
        _, tagged = imap.command("COPY 1:2 Other")
        assert tagged.startswith(b"NO [OVERQUOTA]"), tagged
        two = message(1000)
        _, tagged = imap.command(b"APPEND Other {1000+}\r\n%s {1000+}\r\n%s {1000+}\r\n%s"
                                 % (two, two, two))
        assert tagged.startswith(b"NO [OVERQUOTA]"), tagged
        [status] = imap.ok("STATUS Other (MESSAGES)")
        assert status.endswith(b"(MESSAGES 0)")
        # Space made by EXPUNGE is usable at once (no waiting for the usage cache).
        imap.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        imap.ok("EXPUNGE")
        imap.ok(b"APPEND INBOX {3000+}\r\n" + message(3000))


def test_message_count_limit(quotaServer):
    with loggedIn(quotaServer.imapPort) as imap:
        for _ in range(5):
            imap.append(message(100))
        _, tagged = imap.command(b"APPEND INBOX {100+}\r\n" + message(100))
        assert tagged.startswith(b"NO [OVERQUOTA]"), tagged


def test_smtp_rcpt_over_quota_is_452_and_a_too_big_message_552(quotaServer):
    with smtplib.SMTP("127.0.0.1", quotaServer.smtpPort) as s:
        s.ehlo()
        s.mail("x@remote.test", ["SIZE=20000"])
        code, text = s.rcpt(ALICE)
        assert (code, text[:5]) == (552, b"5.2.2"), text  # bigger than the whole quota
        s.rset()
        s.sendmail("x@remote.test", [ALICE], message(9000))
        s.mail("x@remote.test")
        code, text = s.rcpt(ALICE)
        assert (code, text[:5]) == (250, b"2.1.5"), "under the quota: accepted"
        s.rset()
        s.sendmail("x@remote.test", [ALICE], message(2000))  # now over: 11000 > 10240
        s.mail("x@remote.test")
        code, text = s.rcpt(ALICE)
        assert code == 452 and text.startswith(b"4.2.2 Mailbox full"), text
        code, _ = s.rcpt(BOB)
        assert code == 250, "another recipient of the same transaction is unaffected"
        code, _ = s.rcpt("solo@example.test")
        assert code == 452, "an alias to alice alone"
        code, _ = s.rcpt("team@example.test")
        assert code == 250, "an alias to alice and bob: bob can take it"


def test_default_quota_from_config(dataDir, backend):
    addUser(dataDir, ALICE)
    addUser(dataDir, BOB)
    setQuota(dataDir, BOB, "unlimited")
    srv = startServer(dataDir, storage={"backend": backend},
                      accounts={"default_quota": 1024, "default_quota_messages": 0})
    try:
        with loggedIn(srv.imapPort) as imap:
            assert imap.ok('GETQUOTA ""') == [b'* QUOTA "" (STORAGE 0 1)']
            _, tagged = imap.command(b"APPEND INBOX {2000+}\r\n" + message(2000))
            assert tagged.startswith(b"NO [OVERQUOTA]"), tagged
        with loggedIn(srv.imapPort, BOB) as imap:
            imap.ok(b"APPEND INBOX {2000+}\r\n" + message(2000))
    finally:
        srv.stop()


def test_quota_usage_counts_every_folder(quotaServer):
    with loggedIn(quotaServer.imapPort) as imap:
        imap.ok("CREATE Projects")
        imap.append(message(3000), folder="Projects")
        imap.append(message(3000))
        untagged = imap.ok("GETQUOTAROOT Projects")
        assert re.search(rb"STORAGE 6 10 MESSAGE 2 5", untagged[1]), untagged


def test_concurrent_appends_cannot_overshoot_the_quota(quotaServer):
    """Four sessions append 4000 octets each at once into 10 KiB: two fit, two are refused."""
    sessions = [loggedIn(quotaServer.imapPort) for _ in range(4)]
    try:
        for imap in sessions:
            imap.send(b"q1 APPEND INBOX {4000+}\r\n" + message(4000) + b"\r\n")
        answers = [imap.until(b"q1")[1] for imap in sessions]
        assert sorted(a.split(b" ")[0] for a in answers) == [b"NO", b"NO", b"OK", b"OK"], answers
        [status] = sessions[0].ok("STATUS INBOX (MESSAGES)")
        assert status.endswith(b"(MESSAGES 2)")
    finally:
        for imap in sessions:
            imap.close()
