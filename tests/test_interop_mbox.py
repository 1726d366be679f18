"""The mbox files twistmail writes, shared with the programs that read and write mbox.

neomutt opens them directly (read-only, and read-write: flagging, deleting
and appending under its own fcntl and dot-lock), Python's ``mailbox`` parses
them, and whatever those programs change shows up over IMAP and POP3 of the
running server.  (Python's ``mailbox`` appending with its locks is also in
tests/test_imap_server.py and tests/test_pop3.py, on every backend.)
"""

from __future__ import annotations

import imaplib
import mailbox
import os
import poplib
import re
import smtplib

import pytest
from support import accountDir
from test_interop import requireTool, run

from twistmail.storage import _mboxformat

pytestmark = pytest.mark.interop

ALICE = "alice@example.test"


@pytest.fixture
def backend() -> str:
    return "mbox"


def inbox(server) -> str:
    return os.path.join(accountDir(server.dataDir, ALICE, "mbox"), "INBOX")


def message(n: int, body: bytes = b"") -> bytes:
    return (b"From: x@remote.test\r\nTo: alice@example.test\r\nSubject: mbox interop %d\r\n"
            b"Message-ID: <mbox-%d@remote.test>\r\n\r\nFrom the body of %d\r\n>From quoted\r\n"
            % (n, n, n) + body)


def deliver(server, *messages: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=30) as client:
        for data in messages:
            client.sendmail("x@remote.test", [ALICE], data)


def imap(server) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.imapPort)
    client.login(ALICE, "secret")
    return client


def neomutt(tmp_path, folder: str, keys: str, readOnly: bool):
    """Run neomutt on an mbox file, unattended, typing C{keys}."""
    binary = requireTool("neomutt", "neomutt")
    script = requireTool("script", "bsdutils")  # gives neomutt the terminal it insists on
    rc = tmp_path / "muttrc"
    # folder and spoolfile set: else neomutt first asks whether to create ~/Mail.
    rc.write_text(f'set folder="{tmp_path}"\nset spoolfile="{folder}"\nset mbox_type=mbox\n'
                  "set confirmappend=no\nset confirmcreate=no\nset quit=yes\nset move=no\n"
                  "set mail_check=0\nset sort=mailbox-order\nset delete=yes\nset resolve=no\n"
                  "set mark_old=no\n")
    command = (f"{binary} -n -F {rc} {'-R ' if readOnly else ''}-f {folder} "
               f"-e 'push \"{keys}\"'")
    result = run([script, "-qec", command, "/dev/null"],
                 env=dict(os.environ, TERM="xterm", HOME=str(tmp_path)))
    assert result.returncode == 0, result.stdout[-2000:]


def parsedByNeomutt(path) -> list[dict]:
    """The messages of an mbox neomutt wrote: headers it set, and the subject."""
    out = []
    for raw in re.split(rb"\n(?=From )", path.read_bytes()):
        head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        fields = dict(re.findall(rb"^([A-Za-z-]+): ?(.*?)\r?$", head, re.MULTILINE))
        out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out


def test_neomutt_reads_the_mbox_twistmail_wrote(server, tmp_path):
    deliver(server, message(1), message(2), message(3))
    client = imap(server)
    client.select("INBOX")
    client.store("1", "+FLAGS", "(\\Seen \\Flagged)")
    client.store("2", "+FLAGS", "(\\Seen \\Answered)")
    client.logout()
    before = open(inbox(server), "rb").read()

    out = tmp_path / "copied.mbox"
    neomutt(tmp_path, inbox(server),
            f"<tag-pattern>~A<enter><tag-prefix><copy-message>{out}<enter><quit>", readOnly=True)
    copies = parsedByNeomutt(out)
    assert [c["Subject"] for c in copies] == [f"mbox interop {n}" for n in (1, 2, 3)]
    # neomutt understood the flags: it writes them back out in its own copies.
    assert "R" in copies[0]["Status"] and copies[0]["X-Status"] == "F"
    assert "R" in copies[1]["Status"] and copies[1]["X-Status"] == "A"
    assert "R" not in copies[2].get("Status", "")
    assert out.read_bytes().count(b"\nFrom the body") == 0  # no body line became a separator
    assert open(inbox(server), "rb").read() == before  # -R: nothing written


def test_python_mailbox_parses_it_byte_exactly(server):
    odd = [message(1), b"Subject: no final newline\r\n\r\nFrom here",
           b"Subject: quoted\r\n\r\nFrom a\r\n>>From b\r\n", message(4, b"\r\n\r\n")]
    client = imap(server)
    for data in odd:
        client.append("INBOX", None, None, data)  # APPEND: no Received:, and bytes SMTP would
        # not carry (no final newline)
    client.select("INBOX")
    client.store("1", "+FLAGS", "(\\Seen \\Flagged work)")
    client.store("3", "+FLAGS", "(\\Answered \\Deleted)")
    client.logout()

    box = mailbox.mbox(inbox(server), create=False)
    try:
        assert len(box) == 4
        assert [sorted(m.get_flags().replace(" ", "")) for m in box] == [
            ["F", "O", "R"], ["O"], ["A", "D", "O"], ["O"]]
        assert [m["X-Keywords"].strip() for m in box] == ["work", "", "", ""]
        for key, original in zip(box.keys(), odd, strict=True):
            raw = box.get_bytes(key)
            lines = raw.split(b"\n")
            metadata = 0
            while lines[metadata].split(b":")[0].lower() in _mboxformat.METADATA:
                metadata += 1
            fields = dict(line.split(b": ", 1) for line in lines[:metadata])
            stored = b"\n".join(lines[metadata:])
            if b"Content-Length" in fields:  # as mutt does: the length tells where it ends
                stored = stored[:int(fields[b"Content-Length"])]
            assert _mboxformat.unquote(stored) == original  # mboxrd: one '>' less
    finally:
        box.close()


def test_neomutt_appends_with_its_locks_and_imap_and_pop3_see_it(server, tmp_path):
    deliver(server, message(1))
    watcher = imap(server)
    watcher.select("INBOX")
    source = tmp_path / "source.mbox"
    source.write_bytes(b"From someone@elsewhere.test Mon Jan  1 10:00:00 2024\n"
                       b"From: someone@elsewhere.test\nSubject: saved by neomutt\n\nhello\n\n")
    neomutt(tmp_path, source, f"<copy-message>{inbox(server)}<enter><quit>", readOnly=True)

    watcher.noop()
    assert watcher.response("EXISTS")[1][-1] == b"2"
    typ, data = watcher.fetch("2", "(INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b'INTERNALDATE "01-Jan-2024 10:00:00 +0000"' in data[0][0]  # from its From_ line
    assert data[0][1].startswith(b"Subject: saved by neomutt")
    watcher.logout()

    pop = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
    pop.user(ALICE)
    pop.pass_("secret")
    assert pop.stat()[0] == 2
    assert b"Subject: saved by neomutt" in pop.retr(2)[1]
    pop.quit()


def test_neomutt_flags_and_deletes_in_place_and_imap_keeps_the_uids(server, tmp_path):
    deliver(server, message(1), message(2), message(3))
    client = imap(server)
    client.select("INBOX")
    client.store("3", "+FLAGS", "(\\Seen)")
    validity = client.response("UIDVALIDITY")[1][0]
    before = {uid: client.uid("FETCH", str(uid), "(BODY.PEEK[])")[1][0][1] for uid in (1, 3)}

    # neomutt flags the first message, deletes the second and writes the file back.
    neomutt(tmp_path, inbox(server),
            "<first-entry><flag-message><next-entry><delete-message><sync-mailbox><quit>",
            readOnly=False)

    client.noop()
    assert client.response("EXPUNGE") == ("EXPUNGE", [b"2"])
    client.response("FETCH")  # drop the flag update NOOP reported
    typ, data = client.uid("FETCH", "1:*", "(FLAGS)")
    assert [d.replace(b"\\Recent ", b"").replace(b" \\Recent", b"") for d in data] == [b"1 (UID 1 FLAGS (\\Flagged))",
                                                             b"2 (UID 3 FLAGS (\\Seen))"]
    # neomutt rewrote the header (its own Status, Content-Length, Lines, and an empty line
    # without CR): the messages are still byte for byte what they were.
    for uid in (1, 3):
        assert client.uid("FETCH", str(uid), "(BODY.PEEK[])")[1][0][1] == before[uid]
    client.logout()
    again = imap(server)
    again.select("INBOX")
    assert again.response("UIDVALIDITY")[1][0] == validity
    again.logout()
