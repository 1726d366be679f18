"""Crash safety: SIGKILL in the middle of SMTP load loses nothing acknowledged, duplicates nothing.

The real ``twistd`` process takes mail from several clients at once; after a
random number of ``250`` replies it is killed with SIGKILL (no chance to
clean up), restarted on the same data directory, and every message is
looked for: each acknowledged one must be there exactly once, each other one
at most once, and no file may hold a partial message.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import threading

import pytest
from support import cli
from test_e2e import ALICE, launch, newPassword, retrieveAll

pytestmark = pytest.mark.e2e

CLIENTS = 4
BODY_LINES = 400  # ~30 KiB: the kill often lands mid-DATA or mid-fsync


def message(token: str) -> bytes:
    lines = b"".join(b"line %d of %s\r\n" % (n, token.encode()) for n in range(BODY_LINES))
    return (f"From: load@remote.test\r\nTo: {ALICE}\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@remote.test>\r\n\r\n").encode() + lines + b"END " + \
        token.encode() + b"\r\n"


def sender(port: int, name: str, acknowledged: set, attempted: set, stop: threading.Event,
           lock: threading.Lock) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                while not stop.is_set():
                    token = f"{name}-{n}"
                    n += 1
                    with lock:
                        attempted.add(token)
                    client.sendmail("load@remote.test", [ALICE], message(token))
                    with lock:
                        acknowledged.add(token)
        except (OSError, smtplib.SMTPException):
            if stop.is_set():
                return


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_during_smtp_load_loses_and_duplicates_nothing(tmp_path, seed):
    dataDir = str(tmp_path / "data")
    cli("domain", "add", "example.test", dataDir=dataDir)
    password = newPassword("alice")
    cli("user", "add", ALICE, dataDir=dataDir, stdin=password + "\n")
    process, smtpPort, _, _ = launch(tmp_path, dataDir, name=f"before-kill-{seed}")
    killAfter = random.Random(seed).randint(20, 120)
    acknowledged: set[str] = set()
    attempted: set[str] = set()
    stop, lock = threading.Event(), threading.Lock()
    threads = [threading.Thread(target=sender, args=(smtpPort, f"c{i}", acknowledged, attempted,
                                                     stop, lock), daemon=True)
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        from serverproc import waitUntil

        waitUntil(lambda: len(acknowledged) >= killAfter, 120, f"{killAfter} acknowledged messages",
                  describe=process.describe)
        os.kill(process.proc.pid, signal.SIGKILL)
        process.proc.wait(30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        if process.proc.poll() is None:
            process.proc.kill()
    with lock:
        acknowledged, attempted = set(acknowledged), set(attempted)

    restarted, _, pop3Port, _ = launch(tmp_path, dataDir, name=f"after-kill-{seed}")
    try:
        from test_e2e import E2EServer

        server = E2EServer(dataDir, 0, pop3Port, 0, restarted, {ALICE: password})
        stored = [data for data, _ in retrieveAll(server, ALICE)]
    finally:
        restarted.stop()

    found: dict[str, int] = {}
    for data in stored:
        m = re.search(rb"\r\nSubject: (\S+)\r\n", data)
        assert m, data[:200]
        token = m.group(1).decode()
        assert data.endswith(message(token)), f"{token}: stored partially"
        found[token] = found.get(token, 0) + 1
    lost = sorted(t for t in acknowledged if found.get(t, 0) == 0)
    duplicated = sorted(t for t, count in found.items() if count > 1)
    assert not lost, f"acknowledged with 250 but not stored after SIGKILL: {lost}"
    assert not duplicated, f"stored more than once: {duplicated}"
    assert set(found) <= attempted
    assert len(acknowledged) >= killAfter
    # Nothing half-written is visible to readers: tmp/ may hold leftovers, new/ and cur/ not.
    maildir = os.path.join(dataDir, "mail", "example.test", "alice")
    for sub in ("new", "cur"):
        for name in os.listdir(os.path.join(maildir, sub)):
            with open(os.path.join(maildir, sub, name), "rb") as f:
                assert f.read().endswith(b"\r\n"), name
