"""IMAP4rev1 and its extensions over loopback: raw protocol, imaplib and IMAPClient."""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import socket
import time

import pytest
from imapwire import RawIMAP
from serverproc import waitUntil
from support import (
    accountDir,
    everyBackend,  # noqa: F401 - the backend fixture: each test on every backend
    externalDelivery,
    readAll,
    startServer,
    storedMessages,
)

ALICE = "alice@example.test"


def send(server, *bodies: bytes, rcpt: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
        for body in bodies:
            s.sendmail("x@remote.test", [rcpt], body)


def msg(n: int, subject: str | None = None) -> bytes:
    subject = subject or f"message {n}"
    return (f"From: Sender {n} <s{n}@remote.test>\r\nTo: alice@example.test\r\n"
            f"Subject: {subject}\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{n}@remote.test>\r\n\r\nbody {n}\r\n").encode()


@pytest.fixture
def imap(server):
    client = RawIMAP(server.imapPort)
    client.login()
    yield client
    client.close()


def selected(server, client=None) -> RawIMAP:
    client = client or RawIMAP(server.imapPort)
    client.login()
    client.ok("SELECT INBOX")
    return client


def restarted(server):
    """The same data directory and backend, served again."""
    return startServer(server.dataDir, storage={"backend": server.backend})


# -- capabilities and login ------------------------------------------------------------


def test_greeting_capabilities_and_login(server):
    client = RawIMAP(server.imapPort)
    assert client.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    untagged, tagged = client.command("CAPABILITY")
    caps = set(untagged[0].split()[2:])
    for cap in (b"IMAP4rev1", b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"ENABLE", b"LITERAL+",
                b"ID", b"UNSELECT", b"CHILDREN", b"NAMESPACE", b"AUTH=PLAIN", b"SASL-IR"):
        assert cap in caps, cap
    assert any(c.startswith(b"APPENDLIMIT=") for c in caps)
    _, tagged = client.command('LOGIN alice@example.test wrong')
    assert tagged.startswith(b"NO [AUTHENTICATIONFAILED]")
    _, tagged = client.command('LOGIN "alice@example.test" "secret"')
    assert tagged.startswith(b"OK [CAPABILITY IMAP4rev1 ")
    _, tagged = client.command("LOGIN alice@example.test secret")
    assert tagged.startswith(b"BAD")  # already authenticated
    untagged, tagged = client.command("LOGOUT")
    assert untagged[0].startswith(b"* BYE") and tagged.startswith(b"OK")


def test_login_with_literals_and_literal_plus(server):
    client = RawIMAP(server.imapPort)
    client.send(b"a1 LOGIN {18}\r\n")
    assert client.line().startswith(b"+ ")
    client.send(b"alice@example.test {6+}\r\nsecret\r\n")
    assert client.until(b"a1")[1].startswith(b"OK")


def test_authenticate_plain_inline_and_after_continuation(server):
    import base64

    token = base64.b64encode(b"\0alice@example.test\0secret").decode()
    client = RawIMAP(server.imapPort)
    assert client.command(f"AUTHENTICATE PLAIN {token}")[1].startswith(b"OK")
    client = RawIMAP(server.imapPort)
    client.send(b"a1 AUTHENTICATE PLAIN\r\n")
    assert client.line() == b"+ "
    client.send(token.encode() + b"\r\n")
    assert client.until(b"a1")[1].startswith(b"OK")
    client = RawIMAP(server.imapPort)
    bad = base64.b64encode(b"\0alice@example.test\0nope").decode()
    assert client.command(f"AUTHENTICATE PLAIN {bad}")[1].startswith(b"NO [AUTHENTICATIONFAILED]")
    client.send(b"a2 AUTHENTICATE PLAIN\r\n")
    client.line()
    client.send(b"*\r\n")
    assert client.until(b"a2")[1].startswith(b"BAD")
    assert client.command("NOOP")[1].startswith(b"OK")


def test_too_many_failed_logins_close_the_connection(server):
    client = RawIMAP(server.imapPort)
    for _ in range(3):
        assert client.command("LOGIN alice@example.test nope")[1].startswith(b"NO")
    assert client.line().startswith(b"* BYE")


def test_login_logged_without_password(server):
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        client = RawIMAP(server.imapPort)
        client.command("LOGIN alice@example.test hunter2")
        client.login()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    logins = [e for e in seen if e.get("log_format", "").startswith("imap login")]
    assert [e["log_format"].rsplit("=", 1)[1] for e in logins] == ["failed", "ok"]
    assert "hunter2" not in repr(seen) and "secret" not in repr(logins)


@pytest.mark.parametrize("command", ["SELECT INBOX", "FETCH 1 FLAGS", "LIST \"\" *", "CREATE x"])
def test_commands_before_login_are_bad(server, command):
    client = RawIMAP(server.imapPort)
    assert client.command(command)[1].startswith(b"BAD")
    assert client.command("NOOP")[1].startswith(b"OK")


def test_id_enable_namespace(imap):
    untagged = imap.ok('ID ("name" "pytest" "version" "1")')
    assert untagged[0].startswith(b'* ID ("name" "twistmail"')
    assert imap.ok("ENABLE X-UNKNOWN") == [b"* ENABLED"]  # RFC 5161: ignored
    assert imap.ok("NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL']


# -- SELECT / EXAMINE ----------------------------------------------------------------------


def test_select_reports_everything(server, imap):
    send(server, msg(1), msg(2), msg(3))
    untagged, tagged = imap.command("SELECT INBOX")
    text = b"\n".join(untagged)
    assert tagged.startswith(b"OK [READ-WRITE]")
    assert b"* 3 EXISTS" in untagged
    assert b"* 3 RECENT" in untagged
    assert re.search(rb"\* FLAGS \(.*\\Seen.*\)", text)
    assert re.search(rb"\* OK \[PERMANENTFLAGS \([^)]*\\\*[^)]*\)\]", text)
    assert b"* OK [UNSEEN 1] First unseen" in untagged
    validity = int(re.search(rb"\[UIDVALIDITY (\d+)\]", text).group(1))
    assert validity > 0
    assert b"* OK [UIDNEXT 4] Predicted next UID" in untagged
    # A second session sees them, but no longer as \Recent.
    other = RawIMAP(server.imapPort)
    other.login()
    assert b"* 0 RECENT" in other.ok("EXAMINE INBOX")


def test_examine_is_read_only(server, imap):
    send(server, msg(1))
    untagged, tagged = imap.command("EXAMINE INBOX")
    assert tagged.startswith(b"OK [READ-ONLY]")
    assert b"* OK [PERMANENTFLAGS ()] Read-only mailbox" in untagged
    assert imap.command("STORE 1 +FLAGS (\\Seen)")[1].startswith(b"NO [READ-ONLY]")
    imap.ok("FETCH 1 BODY[]")
    assert b"\\Seen" not in imap.ok("FETCH 1 FLAGS")[0]  # EXAMINE never sets \Seen


def test_failed_select_leaves_no_mailbox_selected(imap):
    imap.ok("SELECT INBOX")
    assert imap.command("SELECT Nope")[1].startswith(b"NO [NONEXISTENT]")
    assert imap.command("FETCH 1 FLAGS")[1].startswith(b"BAD")


# -- mailboxes ----------------------------------------------------------------------------


def listed(imap, pattern: str = "*", reference: str = "") -> dict:
    out = {}
    for line in imap.ok(f'LIST "{reference}" "{pattern}"'):
        m = re.fullmatch(rb'\* LIST \(([^)]*)\) "/" (.+)', line)
        name = m.group(2).strip(b'"').decode("imap4-utf-7")
        out[name] = set(m.group(1).decode().split())
    return out


def test_special_use_folders_created_at_first_login(imap):
    folders = listed(imap)
    assert folders["Sent"] == {"\\Sent", "\\HasNoChildren"}
    assert folders["Trash"] >= {"\\Trash"} and folders["Drafts"] >= {"\\Drafts"}
    assert folders["Junk"] >= {"\\Junk"} and folders["Archive"] >= {"\\Archive"}
    only = [line for line in imap.ok('LIST (SPECIAL-USE) "" "*"')]
    assert len(only) == 5 and all(b"INBOX" not in line for line in only)
    lsub = imap.ok('LSUB "" "*"')
    assert {line.rsplit(b" ", 1)[1] for line in lsub} >= {b"Sent", b"Trash"}


def test_create_delete_rename_hierarchies(imap):
    imap.ok("CREATE Work/Clients/Acme")
    folders = listed(imap)
    assert "\\HasChildren" in folders["Work"] and "\\HasChildren" in folders["Work/Clients"]
    assert "\\HasNoChildren" in folders["Work/Clients/Acme"]
    assert set(listed(imap, "%")) >= {"INBOX", "Work", "Sent"}
    assert set(listed(imap, "%", "Work/")) == {"Work/Clients"}
    assert set(listed(imap, "Work/*")) == {"Work/Clients", "Work/Clients/Acme"}
    assert imap.command("CREATE Work")[1].startswith(b"NO [ALREADYEXISTS]")
    imap.ok("RENAME Work Jobs")
    assert set(listed(imap, "Jobs*")) == {"Jobs", "Jobs/Clients", "Jobs/Clients/Acme"}
    assert "Work" not in listed(imap)
    imap.ok("DELETE Jobs/Clients/Acme")
    assert imap.command("DELETE Jobs/Clients/Acme")[1].startswith(b"NO [NONEXISTENT]")
    assert imap.command("DELETE INBOX")[1].startswith(b"NO")
    assert imap.ok('LIST "" ""') == [b'* LIST (\\Noselect) "/" ""']


def test_rename_inbox_moves_its_messages(server, imap):
    send(server, msg(1), msg(2))
    imap.ok("RENAME inbox Old")
    assert b"* 2 EXISTS" in imap.ok("SELECT Old")
    assert b"* 0 EXISTS" in imap.ok("SELECT INBOX")


def test_non_ascii_mailbox_names_round_trip(imap):
    name = "Réunions/été"
    wire = name.encode("imap4-utf-7").decode()
    imap.ok(f'CREATE "{wire}"')
    assert name in listed(imap)
    assert imap.command('CREATE "&Jjo-!"')[1].startswith(b"OK")
    assert imap.command('CREATE "bad&-utf7&"')[1].startswith(b"NO")


def test_subscribe_unsubscribe_lsub(imap):
    imap.ok("CREATE Lists")
    imap.ok("SUBSCRIBE Lists")
    assert any(line.endswith(b" Lists") for line in imap.ok('LSUB "" "*"'))
    imap.ok("UNSUBSCRIBE Lists")
    assert not any(line.endswith(b" Lists") for line in imap.ok('LSUB "" "*"'))
    # Subscribing to a name that does not exist is refused: test_imap_list.


def test_status(server, imap):
    send(server, msg(1), msg(2))
    [line] = imap.ok("STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)")
    assert re.fullmatch(rb"\* STATUS INBOX \(MESSAGES 2 RECENT 2 UIDNEXT 3 UIDVALIDITY \d+ UNSEEN 2\)",
                        line), line
    assert imap.command("STATUS INBOX (BOGUS)")[1].startswith(b"BAD")
    assert imap.command("STATUS Nope (MESSAGES)")[1].startswith(b"NO [NONEXISTENT]")


# -- APPEND ------------------------------------------------------------------------------


def test_append_with_flags_and_date(imap):
    data = b"Subject: appended\r\n\r\nhello\r\n"
    imap.send(b"a1 APPEND Drafts (\\Draft \\Seen $Label1) \"05-Mar-2023 14:30:00 +0100\" {%d}\r\n"
              % len(data))
    assert imap.line().startswith(b"+ ")
    imap.send(data + b"\r\n")
    _, tagged = imap.until(b"a1")
    m = re.match(rb"OK \[APPENDUID (\d+) 1\]", tagged)
    assert m, tagged
    untagged = imap.ok("SELECT Drafts")
    assert b"[UIDVALIDITY %s]" % m.group(1) in b"\n".join(untagged)
    [line] = imap.ok("FETCH 1 (FLAGS INTERNALDATE BODY.PEEK[])")
    assert b"\\Draft" in line and b"\\Seen" in line and b"$Label1" in line
    assert b'INTERNALDATE "05-Mar-2023 ' in line
    assert line.endswith(data + b")")


def test_append_literal_plus_and_trycreate(imap):
    data = b"Subject: x\r\n\r\ny\r\n"
    imap.send(b"a1 APPEND Nowhere {%d+}\r\n" % len(data) + data + b"\r\n")
    assert imap.until(b"a1")[1].startswith(b"NO [TRYCREATE]")
    imap.send(b"a2 APPEND INBOX {%d+}\r\n" % len(data) + data + b"\r\n")
    assert imap.until(b"a2")[1].startswith(b"OK [APPENDUID")


def test_append_too_big_refused_before_any_byte_is_sent(server):
    client = RawIMAP(server.imapPort)
    client.login()
    client.send(b"a1 APPEND INBOX {999999999}\r\n")
    line = client.line()
    assert line.startswith(b"a1 NO [TOOBIG]"), line
    assert client.command("NOOP")[1].startswith(b"OK"), "the connection stays usable"
    client.send(b"a2 APPEND INBOX {999999999+}\r\n")
    assert client.line().startswith(b"a2 NO [TOOBIG]")
    assert client.line().startswith(b"* BYE")  # the octets are on their way: we must close


def test_disconnect_mid_append_stores_nothing(server):
    client = RawIMAP(server.imapPort)
    client.login()
    client.send(b"a1 APPEND INBOX {2000000+}\r\n" + b"x" * 1_500_000)
    spool = os.path.join(server.dataDir, "spool")
    waitUntil(lambda: os.path.isdir(spool) and os.listdir(spool), 10, "the literal to be spooled")
    client.close()
    waitUntil(lambda: not os.listdir(spool), 10, "the spooled literal to be discarded")
    other = RawIMAP(server.imapPort)
    other.login()
    assert b"* 0 EXISTS" in other.ok("SELECT INBOX")
    assert storedMessages(server.dataDir, ALICE, server.backend) == []
    if server.backend == "maildir":
        assert os.listdir(os.path.join(accountDir(server.dataDir, ALICE), "tmp")) == []


# -- FETCH ---------------------------------------------------------------------------------

NESTED = (
    b"From: \"Ann Example\" <ann@example.org>\r\nTo: team:bob@example.org, cat@example.org;, "
    b"dan@example.org\r\nCc: =?utf-8?q?Ren=C3=A9?= <rene@example.org>\r\nSubject: nested\r\n"
    b"Date: Tue, 2 Jan 2024 09:00:00 +0100\r\nMessage-ID: <nested@example.org>\r\n"
    b"In-Reply-To: <prev@example.org>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n"
    b"This is a preamble.\r\n"
    b"--outer\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
    b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"caf=C3=A9 au lait\r\n"
    b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>caf\xc3\xa9</p>\r\n"
    b"--inner--\r\n\r\n"
    b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: Zed <zed@example.net>\r\nSubject: forwarded\r\n"
    b"Content-Type: text/plain\r\n\r\nforwarded body\r\n"
    b"--outer\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
    b"Content-Disposition: attachment; filename=\"data.bin\"\r\nContent-Transfer-Encoding: base64\r\n"
    b"Content-ID: <part3@example.org>\r\n\r\nAAECAwQ=\r\n"
    b"--outer--\r\nepilogue\r\n"
)


def stored(imap, n: int = 1) -> bytes:
    [line] = imap.ok(f"FETCH {n} BODY.PEEK[]")
    return line.split(b"}\r\n", 1)[1][:-1]


def fetchItem(imap, spec: str, n: int = 1) -> bytes:
    [line] = imap.ok(f"FETCH {n} ({spec})")
    return line


def literalOf(line: bytes, label: bytes) -> bytes:
    m = re.search(re.escape(label) + rb" \{(\d+)\}\r\n", line)
    assert m, (label, line[:300])
    start = m.end()
    return line[start:start + int(m.group(1))]


def test_fetch_body_sections_byte_exact(server, imap):
    send(server, NESTED)
    imap.ok("SELECT INBOX")
    whole = stored(imap)
    assert whole.endswith(NESTED)
    line = fetchItem(imap, "BODY.PEEK[1.1] BODY.PEEK[1.2] BODY.PEEK[2] BODY.PEEK[2.HEADER] "
                           "BODY.PEEK[2.TEXT] BODY.PEEK[3] BODY.PEEK[3.MIME] BODY.PEEK[TEXT]<0.19>")
    assert literalOf(line, b"BODY[1.1]") == b"caf=C3=A9 au lait"
    assert literalOf(line, b"BODY[1.2]") == b"<p>caf\xc3\xa9</p>"
    assert literalOf(line, b"BODY[2]") == (b"From: Zed <zed@example.net>\r\nSubject: forwarded\r\n"
                                           b"Content-Type: text/plain\r\n\r\nforwarded body")
    assert literalOf(line, b"BODY[2.HEADER]").endswith(b"Content-Type: text/plain\r\n\r\n")
    assert literalOf(line, b"BODY[2.TEXT]") == b"forwarded body"
    assert literalOf(line, b"BODY[3]") == b"AAECAwQ="
    assert literalOf(line, b"BODY[3.MIME]").startswith(b"Content-Type: application/octet-stream")
    assert literalOf(line, b"BODY[TEXT]<0>") == b"This is a preamble."
    header = literalOf(fetchItem(imap, "BODY.PEEK[HEADER]"), b"BODY[HEADER]")
    assert whole.startswith(header) and header.endswith(b"\r\n\r\n")
    fields = literalOf(fetchItem(imap, "BODY.PEEK[HEADER.FIELDS (SUBJECT to)]"),
                       b"BODY[HEADER.FIELDS (SUBJECT to)]")
    assert fields == (b"To: team:bob@example.org, cat@example.org;, dan@example.org\r\n"
                      b"Subject: nested\r\n\r\n")
    notFields = literalOf(fetchItem(imap, "BODY.PEEK[HEADER.FIELDS.NOT (Received Subject)]"),
                          b"BODY[HEADER.FIELDS.NOT (Received Subject)]")
    assert b"Subject:" not in notFields and b"Received:" not in notFields and b"From:" in notFields
    assert literalOf(fetchItem(imap, "BODY.PEEK[9]"), b"BODY[9]") == b""
    assert literalOf(fetchItem(imap, "BODY.PEEK[]<5.10>"), b"BODY[]<5>") == whole[5:15]
    assert literalOf(fetchItem(imap, "RFC822.HEADER"), b"RFC822.HEADER") == header


def test_fetch_bodystructure_and_envelope(server, imap):
    send(server, NESTED)
    imap.ok("SELECT INBOX")
    line = fetchItem(imap, "BODYSTRUCTURE")
    assert line == (
        b'* 1 FETCH (BODYSTRUCTURE ((("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 17 1'
        b' NIL NIL NIL NIL)("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 12 1 NIL NIL NIL NIL)'
        b' "ALTERNATIVE" ("BOUNDARY" "inner") NIL NIL NIL) ("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 91'
        b' (NIL "forwarded" (("Zed" NIL "zed" "example.net")) (("Zed" NIL "zed" "example.net"))'
        b' (("Zed" NIL "zed" "example.net")) NIL NIL NIL NIL NIL) ("TEXT" "PLAIN" ("CHARSET"'
        b' "US-ASCII") NIL NIL "7BIT" 14 1 NIL NIL NIL NIL) 5 NIL NIL NIL NIL) ("APPLICATION"'
        b' "OCTET-STREAM" ("NAME" "data.bin") "<part3@example.org>" NIL "BASE64" 8 NIL ("ATTACHMENT"'
        b' ("FILENAME" "data.bin")) NIL NIL) "MIXED" ("BOUNDARY" "outer") NIL NIL NIL))'
    ).replace(b")(", b") (")
    line = fetchItem(imap, "ENVELOPE")
    assert line == (
        b'* 1 FETCH (ENVELOPE ("Tue, 2 Jan 2024 09:00:00 +0100" "nested" (("Ann Example" NIL "ann"'
        b' "example.org")) (("Ann Example" NIL "ann" "example.org")) (("Ann Example" NIL "ann"'
        b' "example.org")) ((NIL NIL "team" NIL) (NIL NIL "bob" "example.org") (NIL NIL "cat"'
        b' "example.org") (NIL NIL NIL NIL) (NIL NIL "dan" "example.org")) (("=?utf-8?q?Ren=C3=A9?="'
        b' NIL "rene" "example.org")) NIL "<prev@example.org>" "<nested@example.org>"))'
    )
    body = fetchItem(imap, "BODY")
    assert body.startswith(b'* 1 FETCH (BODY ((("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL '
                           b'"QUOTED-PRINTABLE" 17 1)')


def test_fetch_macros_internaldate_size_and_uid(server, imap):
    send(server, msg(1))
    imap.ok("SELECT INBOX")
    [line] = imap.ok("FETCH 1 ALL")
    assert re.match(rb'\* 1 FETCH \(FLAGS \(.*\) INTERNALDATE "\d\d-[A-Z][a-z]{2}-\d{4} '
                    rb'\d\d:\d\d:\d\d [+-]\d{4}" RFC822.SIZE \d+ ENVELOPE \(', line), line
    size = int(re.search(rb"RFC822.SIZE (\d+)", line).group(1))
    assert size == len(stored(imap))
    [line] = imap.ok("UID FETCH 1:* (FLAGS)")
    assert line.startswith(b"* 1 FETCH (UID 1 FLAGS (")


def test_flags_only_fetch_of_several_ranges_with_recent(server, imap):
    """FLAGS and UID alone are answered from the folder's flag column, range by range,
    \\Recent added for this session's recent messages, as any other FETCH would."""
    send(server, *(msg(n) for n in range(1, 6)))
    imap.ok("SELECT INBOX")
    imap.ok("STORE 2 +FLAGS.SILENT (\\Seen)")
    imap.ok("NOOP")
    assert imap.ok("FETCH 1:2,4:* (FLAGS UID)") == [
        b"* 1 FETCH (FLAGS (\\Recent) UID 1)", b"* 2 FETCH (FLAGS (\\Recent \\Seen) UID 2)",
        b"* 4 FETCH (FLAGS (\\Recent) UID 4)", b"* 5 FETCH (FLAGS (\\Recent) UID 5)"]
    assert imap.ok("UID FETCH 2:3,5 (FLAGS)") == [
        b"* 2 FETCH (UID 2 FLAGS (\\Recent \\Seen))", b"* 3 FETCH (UID 3 FLAGS (\\Recent))",
        b"* 5 FETCH (UID 5 FLAGS (\\Recent))"]


def test_fetch_body_sets_seen_but_peek_does_not(server, imap):
    send(server, msg(1), msg(2))
    imap.ok("SELECT INBOX")
    imap.ok("FETCH 1 BODY.PEEK[]")
    assert b"\\Seen" not in imap.ok("FETCH 1 FLAGS")[0]
    [line] = imap.ok("FETCH 1 BODY[TEXT]")
    assert b"FLAGS (" in line and b"\\Seen" in line  # the flag change is reported at once
    [line] = imap.ok("FETCH 2 RFC822")
    assert b"\\Seen" in line
    assert imap.ok("SEARCH UNSEEN") == [b"* SEARCH"]


# -- STORE, flags and keywords ---------------------------------------------------------------


def test_store_modes_silent_and_keywords_persist(server, imap):
    send(server, msg(1), msg(2))
    imap.ok("SELECT INBOX")
    flags, permanent, fetched = imap.ok("STORE 1 +FLAGS (\\Flagged $Important)")
    assert flags.startswith(b"* FLAGS (") and b"$Important" in flags  # a new keyword, announced
    assert permanent.startswith(b"* OK [PERMANENTFLAGS (") and b"$Important" in permanent
    assert fetched == b"* 1 FETCH (FLAGS ($Important \\Flagged \\Recent))"
    assert imap.ok("STORE 1 -FLAGS (\\Flagged)") == [b"* 1 FETCH (FLAGS ($Important \\Recent))"]
    assert imap.ok("STORE 1:2 FLAGS.SILENT (\\Answered)") == []
    assert imap.ok("UID STORE 2 +FLAGS (\\Seen)") == \
        [b"* 2 FETCH (UID 2 FLAGS (\\Answered \\Recent \\Seen))"]
    assert imap.command("STORE 1 +FLAGS (\\Bogus)")[1].startswith(b"BAD")
    assert imap.ok("STORE 1 +FLAGS (\\Recent)") == [b"* 1 FETCH (FLAGS (\\Answered \\Recent))"]
    imap.ok("STORE 1 +FLAGS (work)")
    server.stop()
    again = restarted(server)
    try:
        client = selected(again)
        # (\Recent is per server run: a message from the second the server started may be
        # recent again, so it is left out of the comparison.)
        lines = [line.replace(b" \\Recent", b"") for line in client.ok("FETCH 1:2 FLAGS")]
        assert lines == [b"* 1 FETCH (FLAGS (\\Answered work))",
                         b"* 2 FETCH (FLAGS (\\Answered \\Seen))"]
    finally:
        again.stop()


# -- SEARCH ------------------------------------------------------------------------------


def test_search_keys(server, imap):
    send(server, msg(1, "Hello world"), msg(2, "café crème"), msg(3, "other"))
    send(server, b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nFrom: big@remote.test\r\n"
                 b"Date: Fri, 5 Apr 2024 10:00:00 +0000\r\n\r\n" + b"needle in body\r\n" * 100)
    imap.ok("SELECT INBOX")
    imap.ok("STORE 1 +FLAGS (\\Seen \\Flagged)")
    imap.ok("STORE 3 +FLAGS (\\Deleted project)")

    def search(criteria: str, uid: bool = False) -> list[int]:
        [line] = imap.ok(("UID SEARCH " if uid else "SEARCH ") + criteria)
        return [int(n) for n in line.split()[2:]]

    assert search("ALL") == [1, 2, 3, 4]
    assert search("SEEN") == [1] and search("UNSEEN") == [2, 3, 4]
    assert search("FLAGGED UNDELETED") == [1]
    assert search("OR DELETED FLAGGED") == [1, 3]
    assert search("NOT DELETED") == [1, 2, 4]
    assert search("KEYWORD project") == [3] and search("UNKEYWORD project") == [1, 2, 4]
    assert search("SUBJECT hello") == [1]
    assert search('SUBJECT "HELLO WORLD"') == [1]
    assert search("FROM s2@remote") == [2]
    assert search("TO alice") == [1, 2, 3]
    assert search('HEADER Message-ID "<3@"') == [3]
    assert search('HEADER X-Missing ""') == []
    assert search("BODY needle") == [4]
    assert search("TEXT needle") == [4] and search("TEXT Sender") == [1, 2, 3]
    assert search("LARGER 1000") == [4] and search("SMALLER 1000") == [1, 2, 3]
    assert search("2:3") == [2, 3] and search("2:*") == [2, 3, 4]
    assert search("UID 1,4") == [1, 4]
    assert search("SENTON 1-Jan-2024") == [1, 2, 3]
    assert search("SENTSINCE 2-Jan-2024") == [4] and search("SENTBEFORE 2-Jan-2024") == [1, 2, 3]
    today = time.strftime("%d-%b-%Y")
    assert search(f"ON {today}") == [1, 2, 3, 4] and search(f"BEFORE {today}") == []
    assert search(f"SINCE {today}") == [1, 2, 3, 4]
    assert search("RECENT") == [1, 2, 3, 4] and search("NEW") == [2, 3, 4] and search("OLD") == []
    assert search("(OR SUBJECT hello SUBJECT other) UNDELETED") == [1]
    assert search("UID 2:3", uid=True) == [2, 3]
    # CHARSET UTF-8: the search string and the text are both decoded first.
    imap.send(b"a1 SEARCH CHARSET UTF-8 SUBJECT {4}\r\n")
    imap.line()
    imap.send("crè".encode() + b"\r\n")
    untagged, tagged = imap.until(b"a1")
    assert untagged == [b"* SEARCH 2"] and tagged.startswith(b"OK")
    assert search("CHARSET UTF-8 BODY needle") == [4]
    imap.send(b"a2 SEARCH CHARSET UTF-8 SUBJECT {6+}\r\n" + "GRÜẞE".encode()[:0] +
              "grüße".encode()[:6] + b"\r\n")
    untagged, tagged = imap.until(b"a2")
    assert untagged == [b"* SEARCH 4"], untagged  # an RFC 2047 encoded subject, decoded
    assert imap.command("SEARCH CHARSET KOI8-R ALL")[1].startswith(b"NO [BADCHARSET")
    assert imap.command("SEARCH BOGUS")[1].startswith(b"BAD")
    assert imap.command("SEARCH SINCE 32-Jan-2024")[1].startswith(b"BAD")


# -- COPY, MOVE, EXPUNGE, CLOSE, UNSELECT ----------------------------------------------------


def test_copy_move_with_uidplus(server, imap):
    send(server, msg(1), msg(2), msg(3))
    imap.ok("SELECT INBOX")
    imap.ok("STORE 2 +FLAGS (\\Flagged)")
    _, tagged = imap.command("COPY 2:3 Archive")
    m = re.match(rb"OK \[COPYUID (\d+) 2:3 1:2\]", tagged)
    assert m, tagged
    assert imap.command("COPY 1 Nowhere")[1].startswith(b"NO [TRYCREATE]")
    untagged, tagged = imap.command("UID MOVE 1 Trash")
    assert re.match(rb"\* OK \[COPYUID \d+ 1 1\]", untagged[0])
    assert b"* 1 EXPUNGE" in untagged and tagged.startswith(b"OK")
    untagged = imap.ok("SELECT Archive")
    assert b"* 2 EXISTS" in untagged
    assert imap.ok("FETCH 1 FLAGS") == [b"* 1 FETCH (FLAGS (\\Flagged \\Recent))"]
    assert literalOf(imap.ok("FETCH 2 BODY.PEEK[TEXT]")[0], b"BODY[TEXT]") == b"body 3\r\n"


def test_expunge_uid_expunge_close_unselect(server, imap):
    send(server, msg(1), msg(2), msg(3), msg(4))
    imap.ok("SELECT INBOX")
    imap.ok("STORE 1:4 +FLAGS.SILENT (\\Deleted)")
    untagged = imap.ok("UID EXPUNGE 2:3")
    assert untagged == [b"* 3 EXPUNGE", b"* 2 EXPUNGE"]
    assert imap.ok("UID SEARCH ALL") == [b"* SEARCH 1 4"]
    imap.ok("UNSELECT")  # no expunge
    assert b"* 2 EXISTS" in imap.ok("SELECT INBOX")
    assert imap.ok("CLOSE") == []  # expunges silently
    assert b"* 0 EXISTS" in imap.ok("SELECT INBOX")
    assert imap.command("EXPUNGE")[1].startswith(b"OK")


# -- UIDs and UIDVALIDITY ------------------------------------------------------------------


def test_uids_ascending_never_reused_and_validity_stable_across_restart(server):
    send(server, msg(1), msg(2))
    client = selected(server)
    validity = re.search(rb"UIDVALIDITY (\d+)", b" ".join(client.ok("EXAMINE INBOX"))).group(1)
    client.ok("SELECT INBOX")
    client.ok("STORE 2 +FLAGS (\\Deleted)")
    client.ok("EXPUNGE")
    send(server, msg(3))
    client.ok("NOOP")
    assert client.ok("UID SEARCH ALL") == [b"* SEARCH 1 3"]  # 2 is never handed out again
    server.stop()
    again = restarted(server)
    try:
        other = RawIMAP(again.imapPort)
        other.login()
        untagged = other.ok("SELECT INBOX")
        assert b"[UIDVALIDITY " + validity + b"]" in b" ".join(untagged)
        assert b"* OK [UIDNEXT 4] Predicted next UID" in untagged
        send(again, msg(4))
        other.ok("NOOP")
        assert other.ok("UID SEARCH ALL") == [b"* SEARCH 1 3 4"]
    finally:
        again.stop()


def test_delivery_during_open_session_keeps_validity(server):
    client = selected(server)
    before = re.search(rb"UIDVALIDITY (\d+)", b" ".join(client.ok("SELECT INBOX"))).group(1)
    send(server, msg(1))
    assert b"* 1 EXISTS" in client.ok("NOOP")
    after = re.search(rb"UIDVALIDITY (\d+)", b" ".join(client.ok("SELECT INBOX"))).group(1)
    assert before == after


# -- other sessions, IDLE, other programs ------------------------------------------------------


def test_idle_push_on_smtp_delivery_within_a_second(server):
    client = selected(server)
    client.send(b"i1 IDLE\r\n")
    assert client.line() == b"+ idling"
    start = time.monotonic()
    send(server, msg(1))
    assert client.line(timeout=5) == b"* 1 EXISTS"
    assert time.monotonic() - start < 1.0 + 0.5  # the SMTP transaction itself included
    assert client.line() == b"* 1 RECENT"
    client.send(b"DONE\r\n")
    assert client.until(b"i1")[1].startswith(b"OK")


def test_idle_reports_other_sessions_flags_and_expunges(server):
    send(server, msg(1), msg(2))
    watcher = selected(server)
    actor = selected(server)
    watcher.send(b"i1 IDLE\r\n")
    assert watcher.line() == b"+ idling"
    actor.ok("STORE 2 +FLAGS (\\Flagged)")
    assert watcher.line() == b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent))"
    actor.ok("STORE 1 +FLAGS (\\Deleted)")
    watcher.line()
    actor.ok("EXPUNGE")
    assert watcher.line() == b"* 1 EXPUNGE"
    watcher.send(b"DONE\r\n")
    assert watcher.until(b"i1")[1].startswith(b"OK")


def test_expunge_by_another_session_waits_until_allowed(server):
    send(server, msg(1), msg(2))
    a = selected(server)
    b = selected(server)
    b.ok("STORE 1 +FLAGS (\\Deleted)")
    b.ok("EXPUNGE")
    # RFC 3501 §7.4.1: not during FETCH; the message keeps its number until then.
    untagged = a.ok("FETCH 2 (UID)")
    assert b"* 2 FETCH (UID 2)" in untagged and not any(b"EXPUNGE" in u for u in untagged)
    assert a.ok("NOOP")[0] == b"* 1 EXPUNGE"
    assert a.ok("FETCH 1 (UID)") == [b"* 1 FETCH (UID 2)"]


def test_another_programs_delivery_shows_up_without_restart(server):
    """procmail writing the Maildir, or appending to the mbox with fcntl and dot-lock."""
    client = selected(server)
    client.send(b"i1 IDLE\r\n")
    assert client.line() == b"+ idling"
    externalDelivery(server.dataDir, ALICE, msg(7), server.backend)
    assert client.line(timeout=3) == b"* 1 EXISTS"
    client.send(b"DONE\r\n")
    client.until(b"i1")
    assert literalOf(client.ok("FETCH 1 BODY.PEEK[]")[0], b"BODY[]") == msg(7)


# -- hostile input -----------------------------------------------------------------------------


def tree(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root)
            for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/etc", "a//b", "x" * 2000, "a\x01b",
                                  "INBOX/../../x", "a/./b", ".."])
def test_mailbox_names_cannot_escape(server, imap, name):
    imap.ok("LIST \"\" *")  # the special-use folders exist: the tree is settled
    before = tree(server.dataDir)
    for command in ("CREATE", "SELECT", "DELETE", "SUBSCRIBE"):
        wire = name.replace("\\", "\\\\").encode()
        _, tagged = imap.command(command.encode() + b' "' + wire + b'"')
        assert tagged.startswith(b"NO"), (command, name, tagged)
    _, tagged = imap.command(b'RENAME Sent "' + name.replace("\\", "\\\\").encode() + b'"')
    assert tagged.startswith(b"NO"), tagged
    assert tree(server.dataDir) == before
    assert imap.command("NOOP")[1].startswith(b"OK")


@pytest.mark.parametrize("command, empty", [
    ("FETCH 0 FLAGS", False), ("FETCH 1:0 FLAGS", False), ("FETCH 4294967296 FLAGS", False),
    ("FETCH *:* FLAGS", True), ("FETCH 9 FLAGS", False), ("STORE 0 +FLAGS (\\Seen)", False),
    ("FETCH 1 (FLAGS", False), ("FETCH 1 BODY[4.X]", False), ("FETCH 1 NOTANITEM", False),
    ("SEARCH UID 0", False), ("COPY 0 Trash", False),
])
def test_invalid_sequence_sets_and_syntax_are_bad(server, command, empty):
    if not empty:
        send(server, msg(1))
    client = selected(server)
    assert client.command(command)[1].startswith(b"BAD"), command
    assert client.command("NOOP")[1].startswith(b"OK")


def test_a_thousand_pipelined_commands_answered_in_order(server):
    send(server, msg(1))
    client = selected(server)
    commands = []
    for n in range(1000):
        verb = ("NOOP", "FETCH 1 (UID)", "SEARCH ALL", "BOGUS", "FETCH 0 FLAGS")[n % 5]
        commands.append(f"p{n} {verb}\r\n".encode())
    client.send(b"".join(commands))
    order = []
    while len(order) < 1000:
        line = client.line()
        if line.startswith(b"p"):
            order.append(int(line.split()[0][1:]))
    assert order == list(range(1000))


def test_overlong_line_and_unknown_commands_keep_the_connection(server):
    client = selected(server)
    client.send(b"x1 NOOP " + b"a" * 100_000 + b"\r\n")
    assert client.line().startswith(b"x1 BAD")
    assert client.command("FROBNICATE")[1].startswith(b"BAD")
    client.send(b"\r\n")
    assert client.line().startswith(b"* BAD")
    assert client.command("NOOP")[1].startswith(b"OK")


def test_garbage_never_produces_a_traceback(server):
    client = RawIMAP(server.imapPort)
    for junk in (b"\x00\xff\xfe", b"a1", b"a1 LOGIN", b'a1 LOGIN "unterminated', b"a1 LOGIN (x y)",
                 b"a1 SELECT", b"+ DONE", b"a1 UID", b"a1 UID NOOP", b"a1 AUTHENTICATE X"):
        client.send(junk + b"\r\n")
        line = client.line()
        assert re.match(rb"(\S+) (BAD|NO) ", line), (junk, line)
    assert client.command("NOOP")[1].startswith(b"OK")


# -- real client libraries ---------------------------------------------------------------------


def test_imaplib_session(server):
    send(server, msg(1), msg(2))
    m = imaplib.IMAP4("127.0.0.1", server.imapPort)
    m.login(ALICE, "secret")
    typ, data = m.select("INBOX")
    assert (typ, data) == ("OK", [b"2"])
    typ, data = m.uid("FETCH", "1:*", "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK" and data[0][1] == b"Subject: message 1\r\n\r\n"
    assert m.append("Sent", "(\\Seen)", imaplib.Time2Internaldate(time.time()),
                    b"Subject: out\r\n\r\nhi\r\n")[0] == "OK"
    m.create("Projects/2024")
    assert any(b"Projects/2024" in line for line in m.list()[1])
    m.store("1", "+FLAGS", "\\Deleted")
    assert m.expunge() == ("OK", [b"1"])
    m.logout()


def test_imapclient_session(server):
    imapclient = pytest.importorskip("imapclient")  # in the test extra: never skipped in CI
    send(server, NESTED, msg(2))
    with imapclient.IMAPClient("127.0.0.1", port=server.imapPort, ssl=False) as client:
        client.login(ALICE, "secret")
        assert b"IDLE" in client.capabilities() and client.has_capability("MOVE")
        info = client.select_folder("INBOX")
        assert info[b"EXISTS"] == 2 and info[b"UIDNEXT"] == 3
        data = client.fetch([1], ["BODYSTRUCTURE", "ENVELOPE", "FLAGS"])
        structure = data[1][b"BODYSTRUCTURE"]
        assert structure.is_multipart
        assert data[1][b"ENVELOPE"].subject == b"nested"
        assert client.search(["SUBJECT", "message"]) == [2]
        client.add_flags([2], [b"\\Flagged"])
        assert set(client.get_flags([2])[2]) == {b"\\Flagged", b"\\Recent"}
        client.move([2], "Archive")
        assert client.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
        folders = {name: flags for flags, _, name in client.list_folders()}
        assert b"\\Trash" in folders["Trash"]
        client.idle()
        send(server, msg(3))
        responses = client.idle_check(timeout=5)
        client.idle_done()
        assert (2, b"EXISTS") in responses


def test_connection_limit_answers_bye(dataDir):
    from support import addUser

    addUser(dataDir, ALICE)
    srv = startServer(dataDir, server={"max_connections_per_ip": 2})
    try:
        keep = [RawIMAP(srv.imapPort) for _ in range(2)]
        sock = socket.create_connection(("127.0.0.1", srv.imapPort), timeout=5)
        assert readAll(sock, b"\r\n").startswith(b"* BYE [UNAVAILABLE]")
        sock.close()
        for client in keep:
            client.close()
    finally:
        srv.stop()
