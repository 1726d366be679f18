"""IMAP interoperability with real clients from Debian: mbsync (isync), fetchmail and neomutt.

They run against the in-process server (conftest ``server``: alice and bob
@example.test, password "secret").  The tools are required: .ci/run installs
them, and a missing one fails the test with the command to install it.
"""

from __future__ import annotations

import imaplib
import os
import re
import smtplib

import pytest
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend
from test_interop import requireTool, run

pytestmark = pytest.mark.interop


ALICE = "alice@example.test"


def deliver(server, *messages: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        for message in messages:
            client.sendmail("x@remote.test", [ALICE], message)


def message(n: int) -> bytes:
    return (f"From: x@remote.test\r\nTo: {ALICE}\r\nSubject: interop {n}\r\n"
            f"Message-ID: <interop-{n}@remote.test>\r\n\r\nbody {n}\r\n.dot line\r\n").encode()


def imap(server) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.imapPort)
    client.login(ALICE, "secret")
    return client


# -- mbsync ----------------------------------------------------------------------------


class Mbsync:
    """One mbsync setup: a local Maildir tree kept in sync with alice's account."""

    def __init__(self, server, root) -> None:
        self.binary = requireTool("mbsync", "isync")
        self.local = root / "mail"
        self.local.mkdir()
        self.rc = root / "mbsyncrc"
        self.rc.write_text(
            f"IMAPAccount twistmail\nHost 127.0.0.1\nPort {server.imapPort}\nUser {ALICE}\n"
            f"Pass secret\nSSLType None\nAuthMechs LOGIN\n\n"
            f"IMAPStore remote\nAccount twistmail\n\n"
            f"MaildirStore local\nPath {self.local}/\nInbox {self.local}/INBOX\n"
            f"SubFolders Verbatim\n\n"
            f"Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\n"
            f"Expunge Both\nSyncState *\n")

    def sync(self) -> str:
        result = run([self.binary, "-c", str(self.rc), "-V", "-a"])
        assert result.returncode == 0, result.stdout
        return result.stdout

    def files(self, folder: str = "INBOX") -> dict[str, bytes]:
        out = {}
        for sub in ("new", "cur"):
            path = self.local / folder / sub
            for name in sorted(os.listdir(path)) if path.is_dir() else []:
                out[f"{sub}/{name}"] = (path / name).read_bytes()
        return out


def flagsOf(name: str) -> str:
    return name.rsplit(":2,", 1)[1] if ":2," in name else ""


def test_mbsync_two_way_sync_with_flags(server, tmp_path):
    deliver(server, message(1), message(2))
    mbsync = Mbsync(server, tmp_path)
    mbsync.sync()

    # Pull: both messages, with the content the server stores.
    local = mbsync.files()
    assert len(local) == 2
    # mbsync stores LF line ends and adds its own X-TUID header; otherwise the same bytes.
    bodies = sorted(re.sub(rb"X-TUID: \S+\n", b"", b) for b in local.values())
    assert [b.endswith(message(n).replace(b"\r\n", b"\n"))
            for n, b in zip((1, 2), bodies, strict=True)] == [True, True]
    # The special-use folders came along.
    assert {"Sent", "Trash", "Drafts", "Junk", "Archive"} <= set(os.listdir(mbsync.local))

    # Push: a message written locally (as a mail client would) reaches the server.
    pushed = b"From: alice@example.test\nSubject: written offline\n\ndraft text\n"
    (mbsync.local / "INBOX" / "cur" / "1700000000.local:2,S").write_bytes(pushed)
    mbsync.sync()
    client = imap(server)
    client.select("INBOX")
    typ, data = client.search(None, 'SUBJECT "written offline"')
    assert typ == "OK" and data[0], data
    number = data[0].split()[0]
    typ, data = client.fetch(number, "(FLAGS BODY.PEEK[TEXT])")
    assert b"\\Seen" in data[0][0] and data[0][1].replace(b"\r\n", b"\n") == b"draft text\n"

    # Flags, server to client: \Flagged set over IMAP shows up as F in the file name.
    typ, data = client.search(None, 'SUBJECT "interop 1"')
    client.store(data[0], "+FLAGS", "\\Flagged")
    mbsync.sync()
    flagged = [name for name, body in mbsync.files().items() if b"interop 1" in body]
    assert len(flagged) == 1 and "F" in flagsOf(flagged[0]), flagged

    # Flags, client to server: R (answered) set locally shows up as \Answered.
    [name] = [name for name, body in mbsync.files().items() if b"interop 2" in body]
    path = mbsync.local / "INBOX" / name
    target = name.replace("new/", "cur/")
    target = target if ":2," in target else target + ":2,"
    os.rename(path, mbsync.local / "INBOX" / (target + "R"))
    mbsync.sync()
    client.noop()
    typ, data = client.search(None, 'SUBJECT "interop 2" ANSWERED')
    assert data[0], "the \\Answered flag set by mbsync is on the server"

    # Expunge on the client side deletes on the server (Expunge Both).
    client.store(number, "+FLAGS", "\\Deleted")
    client.expunge()
    mbsync.sync()
    assert not any(b"written offline" in body for body in mbsync.files().values())
    client.logout()


# -- fetchmail over IMAP --------------------------------------------------------------------


def test_fetchmail_over_imap_byte_exact(server, tmp_path):
    binary = requireTool("fetchmail", "fetchmail")
    deliver(server, message(7))
    client = imap(server)
    client.select("INBOX")
    stored = client.fetch("1", "(BODY.PEEK[])")[1][0][1]
    client.logout()
    home = tmp_path / "fetchmail-home"
    home.mkdir(mode=0o700)
    out = tmp_path / "fetched"
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(
        f"poll 127.0.0.1 with proto IMAP service {server.imapPort}\n"
        f'  user "{ALICE}" there with password "secret" is "root" here\n'
        f"  options fetchall keep no stripcr sslproto ''\n"
        f'  mda "cat >> {out}"\n')
    rcfile.chmod(0o600)
    result = run([binary, "--nosyslog", "--invisible", "--verbose", "-f", str(rcfile),
                   "--pidfile", str(home / "fetchmail.pid")],
                 env=dict(os.environ, FETCHMAILHOME=str(home)))
    assert result.returncode == 0, result.stdout
    assert "1 message for alice@example.test" in result.stdout
    assert out.read_bytes() == stored
    # keep: still on the server, now \Seen.
    client = imap(server)
    client.select("INBOX")
    assert b"\\Seen" in client.fetch("1", "(FLAGS)")[1][0]
    client.logout()


# -- neomutt --------------------------------------------------------------------------------


def test_neomutt_reads_a_folder_in_batch(server, tmp_path):
    """neomutt opens the IMAP folder and copies every message to a local mbox, unattended."""
    binary = requireTool("neomutt", "neomutt")
    script = requireTool("script", "bsdutils")  # gives neomutt the terminal it insists on
    deliver(server, message(1), message(2))
    client = imap(server)
    client.create("Lists")
    client.append("Lists", None, None, message(3))
    client.logout()
    out = tmp_path / "copied.mbox"
    rc = tmp_path / "muttrc"
    rc.write_text(
        f'set imap_user="{ALICE}"\nset imap_pass="secret"\nset ssl_starttls=no\n'
        f'set ssl_force_tls=no\nset folder="imap://127.0.0.1:{server.imapPort}/"\n'
        f'set spoolfile="+INBOX"\nset mbox_type=mbox\nset confirmappend=no\n'
        f"set confirmcreate=no\nset quit=yes\nset move=no\nset mail_check=0\n")
    for folder, expected in (("INBOX", [1, 2]), ("Lists", [3])):
        out.unlink(missing_ok=True)
        keys = f"<tag-pattern>~A<enter><tag-prefix><copy-message>{out}<enter><quit>"
        command = (f"{binary} -n -F {rc} -f imap://127.0.0.1:{server.imapPort}/{folder} "
                   f"-e 'push \"{keys}\"'")
        result = run([script, "-qec", command, "/dev/null"],
                     env=dict(os.environ, TERM="xterm", HOME=str(tmp_path)))
        assert result.returncode == 0, result.stdout[-2000:]
        copied = out.read_bytes()
        subjects = re.findall(rb"^Subject: interop (\d+)$", copied, re.MULTILINE)
        assert sorted(int(s) for s in subjects) == expected, copied[:2000]
        assert copied.count(b"\n..dot line") == 0 and b"\n.dot line" in copied
