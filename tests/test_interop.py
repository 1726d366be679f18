"""Interoperability with real third-party mail clients: swaks (SMTP) and fetchmail (POP3).

These run against the in-process server (conftest ``server``: alice and bob
@example.test, password "secret").  The tools are required: .ci/run installs
them, and a missing one fails the test with the command to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from support import (
    accountDir,
    everyBackend,  # noqa: F401 - the backend fixture: each test on every backend
    storedMessages,
)

pytestmark = pytest.mark.interop


ALICE = "alice@example.test"
BOB = "bob@example.test"


def requireTool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; the interop tests need it. Install it with "
                    f"'apt-get install {package}' (.ci/run does this in CI).")
    return path


def run(argv: list[str], timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)


def stored(server, address: str) -> list[bytes]:
    return storedMessages(server.dataDir, address, server.backend)


RECEIVED = re.compile(
    rb"Received: from (?P<helo>\S+) \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.example\.test \(twistmail\) with ESMTP id (?P<id>[0-9A-F]+)"
    rb"(?:\r\n\tfor <(?P<for>[^>]+)>)?; [^\r\n]+\r\n")


def swaks(server, *args: str) -> subprocess.CompletedProcess:
    return run([requireTool("swaks", "swaks"), "--server", "127.0.0.1", "--port",
                str(server.smtpPort), "--helo", "swaks.remote.test", "--from", "x@remote.test",
                "--timeout", "30", *args])


def assertNothingStored(server, *extra: str) -> None:
    for address in (ALICE, BOB, *extra):
        assert stored(server, address) == [], address
    spool = os.path.join(server.dataDir, "spool")
    assert not os.path.isdir(spool) or os.listdir(spool) == []


def assertNoDataPhase(transcript: str) -> None:
    """swaks never sent DATA and the server never answered 354.  Matched on whole reply
    and command lines: the digits 354 may appear elsewhere, in the port number for one."""
    assert not re.search(r"^<[-*~] +354[ -]", transcript, re.MULTILINE), transcript
    assert not re.search(r"^ [-~]> DATA$", transcript, re.MULTILINE), transcript


def test_swaks_delivers_to_local_user(server, tmp_path):
    # swaks sends the file followed by CRLF . CRLF; it dot-stuffs lines beginning with ".".
    message = (b"From: Remote <x@remote.test>\r\n"
               b"To: Alice <alice@example.test>\r\n"
               b"Subject: swaks interop\r\n"
               b"\r\n"
               b"Hello from swaks.\r\n"
               b".a line with a leading dot\r\n"
               b".\r\n"
               b"last line")
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    result = swaks(server, "--to", ALICE, "--data", f"@{path}")
    assert result.returncode == 0, result.stdout
    m = re.search(r"<-  250 2\.0\.0 Ok: queued as ([0-9A-F]+)$", result.stdout, re.MULTILINE)
    assert m, result.stdout

    [data] = stored(server, ALICE)
    header = RECEIVED.match(data)
    assert header, data
    assert header.group("helo") == b"swaks.remote.test"
    assert header.group("id").decode() == m.group(1)
    assert header.group("for") == ALICE.encode()
    assert data[header.end():] == message + b"\r\n"
    assert stored(server, BOB) == []


def test_swaks_pipelined_transaction_with_two_recipients(server):
    result = swaks(server, "--pipeline", "--to", f"{ALICE},{BOB}",
                   "--header", "Subject: pipelined", "--body", "one copy each")
    assert result.returncode == 0, result.stdout
    assert re.search(r"^<-  250 2\.1\.5 ", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^<-  250 2\.0\.0 Ok: queued as", result.stdout, re.MULTILINE), result.stdout
    [forAlice] = stored(server, ALICE)
    [forBob] = stored(server, BOB)
    assert forAlice == forBob
    header = RECEIVED.match(forAlice)
    assert header and header.group("for") is None  # no "for" with several recipients
    assert b"\r\nSubject: pipelined\r\n" in forAlice
    assert b"\r\n\r\none copy each\r\n" in forAlice


def test_swaks_unknown_user_is_rejected_with_550_5_1_1(server):
    result = swaks(server, "--to", "nobody@example.test", "--body", "to nobody")
    assert result.returncode != 0, result.stdout
    assert re.search(r"^<\*\* +550 5\.1\.1 ", result.stdout, re.MULTILINE), result.stdout
    assertNoDataPhase(result.stdout)
    assertNothingStored(server, "nobody@example.test")
    assert not os.path.exists(accountDir(server.dataDir, "nobody@example.test", server.backend))


def test_swaks_relay_to_a_remote_domain_is_denied_with_550_5_7_1(server):
    result = swaks(server, "--to", "victim@elsewhere.test", "--body", "relay attempt")
    assert result.returncode != 0, result.stdout
    assert re.search(r"^<\*\* +550 5\.7\.1 Relaying denied", result.stdout, re.MULTILINE), \
        result.stdout
    assertNoDataPhase(result.stdout)
    assertNothingStored(server)
    assert not os.path.exists(os.path.dirname(
        accountDir(server.dataDir, "victim@elsewhere.test", server.backend)))


# -- fetchmail over POP3 -----------------------------------------------------------------


def fetchmail(server, tmp_path, keep: bool) -> tuple[subprocess.CompletedProcess, bytes]:
    """One fetchmail poll of alice's maildrop; returns its result and what its MDA received.

    ``sslproto ''``: fetchmail >= 6.4 otherwise insists on STLS, which twistmail
    does not offer yet.  ``no stripcr`` and ``--invisible`` hand the message to
    the MDA exactly as retrieved.
    """
    binary = requireTool("fetchmail", "fetchmail")
    home = tmp_path / "fetchmail-home"
    home.mkdir(mode=0o700, exist_ok=True)
    out = tmp_path / "fetched.mbox"
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(
        f"poll 127.0.0.1 with proto POP3 service {server.pop3Port}\n"
        f'  user "{ALICE}" there with password "secret" is "root" here\n'
        f"  options fetchall {'keep' if keep else 'no keep'} no stripcr sslproto ''\n"
        f'  mda "cat >> {out}"\n')
    rcfile.chmod(0o600)
    env = dict(os.environ, FETCHMAILHOME=str(home))
    result = run([binary, "--nosyslog", "--invisible", "--verbose", "-f", str(rcfile),
                  "--pidfile", str(home / "fetchmail.pid")], env=env)
    return result, out.read_bytes() if out.exists() else b""


def deposit(server, body: bytes) -> bytes:
    import smtplib

    message = b"From: x@remote.test\r\nSubject: for fetchmail\r\n\r\n" + body
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        client.sendmail("x@remote.test", [ALICE], message)
    [data] = stored(server, ALICE)
    return data


def test_fetchmail_retrieves_byte_exact_and_keeps(server, tmp_path):
    data = deposit(server, b"fetch me\r\n.leading dot\r\n..two dots\r\n")
    result, fetched = fetchmail(server, tmp_path, keep=True)
    assert result.returncode == 0, result.stdout  # 0: mail was retrieved
    assert "1 message for alice@example.test" in result.stdout
    assert fetched == data
    assert "DELE" not in result.stdout
    assert stored(server, ALICE) == [data]


def test_fetchmail_without_keep_deletes_from_the_server(server, tmp_path):
    data = deposit(server, b"fetch and delete me\r\n")
    result, fetched = fetchmail(server, tmp_path, keep=False)
    assert result.returncode == 0, result.stdout
    assert fetched == data
    assert re.search(r"POP3> DELE 1\n.*POP3< \+OK", result.stdout), result.stdout
    assert stored(server, ALICE) == []

    again, _ = fetchmail(server, tmp_path, keep=False)
    assert again.returncode == 1, again.stdout  # 1: no mail
