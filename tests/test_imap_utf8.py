"""UTF8=ACCEPT (RFC 6855): UTF-8 mailbox names and headers once enabled, a downgraded view
(RFC 6857) before, on every backend; one legacy (modified UTF-7) and one UTF-8 session on
the same account see the same folders."""

from __future__ import annotations

import email
import imaplib
import os
import re
from email import policy

import pytest
from imapwire import RawIMAP, loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend

MESSAGE = (
    'From: "Jörg Müller" <jörg@bücher.example>\r\n'
    "To: Ann <ann@bücher.example>, bob@example.test\r\n"
    "Subject: Grüße aus Köln 日本\r\n"
    "Message-ID: <utf8-1@example.test>\r\n"
    "Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Hallo, schöne Grüße.\r\n").encode()
SUBJECT = "Grüße aus Köln 日本"


@pytest.fixture
def legacy(server):
    with loggedIn(server.imapPort) as client:
        yield client


@pytest.fixture
def modern(server):
    with loggedIn(server.imapPort) as client:
        assert client.ok("ENABLE UTF8=ACCEPT") == [b"* ENABLED UTF8=ACCEPT"]
        yield client


@pytest.fixture
def utf8lib(server):
    m = imaplib.IMAP4("127.0.0.1", server.imapPort, timeout=10)
    m.login("alice@example.test", "secret")
    assert "UTF8=ACCEPT" in m.capabilities
    assert m.enable("UTF8=ACCEPT")[0] == "OK"
    yield m
    m.logout()


def appendUtf8(client: RawIMAP, message: bytes = MESSAGE, folder: bytes = b"INBOX"):
    """APPEND with the RFC 6855 §4 UTF8 data item, as Thunderbird sends it."""
    return client.command(b"APPEND " + folder + b" UTF8 (~{%d+}\r\n" % len(message) + message + b")")


def listed(untagged: list[bytes]) -> set[bytes]:
    """The mailbox names of LIST lines, as they were on the wire (quotes undone)."""
    out = set()
    for line in untagged:
        m = re.fullmatch(rb'\* LIST \([^)]*\) "/" (.+)', line)
        assert m, line
        wire = m.group(1)
        if wire.startswith(b'"'):
            wire = re.sub(rb"\\(.)", rb"\1", wire[1:-1])
        out.add(wire)
    return out


def test_capability_and_enable(server, legacy):
    caps = legacy.ok("CAPABILITY")[0].split()
    assert b"UTF8=ACCEPT" in caps
    assert legacy.ok("ENABLE utf8=accept") == [b"* ENABLED UTF8=ACCEPT"]
    # RFC 5161 §3.2: ENABLED lists only what this command enabled.
    assert legacy.ok("ENABLE UTF8=ACCEPT CONDSTORE") == [b"* ENABLED CONDSTORE"]


def test_enable_in_selected_state_is_refused(legacy):
    legacy.ok("SELECT INBOX")
    untagged, tagged = legacy.command("ENABLE UTF8=ACCEPT")
    assert tagged == b"BAD ENABLE UTF8=ACCEPT only before SELECT or EXAMINE (RFC 6855 section 3)"
    assert b"/" in legacy.ok('LIST "" "INBOX"')[0]  # names still in modified UTF-7: nothing changed
    legacy.ok("UNSELECT")
    assert legacy.ok("ENABLE UTF8=ACCEPT") == [b"* ENABLED UTF8=ACCEPT"]


def test_utf7_and_utf8_sessions_share_folders(server, legacy, utf8lib):
    """A folder made by either kind of client is the same folder for the other."""
    assert utf8lib.create('"Café/日本"')[0] == "OK"
    assert "Café/日本".encode("imap4-utf-7") in listed(legacy.ok('LIST "" "*"'))
    legacy.ok(b"CREATE " + "Ärger".encode("imap4-utf-7"))
    typ, data = utf8lib.list('""', '"*"')
    assert typ == "OK"
    assert b'(\\HasNoChildren) "/" "\xc3\x84rger"' in data  # RFC 6855 §3: UTF-8 in a quoted string
    typ, data = utf8lib.list('""', '"Caf%"')  # patterns are UTF-8 too
    assert data == [b'(\\HasChildren) "/" "Caf\xc3\xa9"']
    typ, data = utf8lib.list('""', '"Caf*" RETURN (STATUS (MESSAGES))')  # RFC 5819, in UTF-8
    assert data == [b'(\\HasChildren) "/" "Caf\xc3\xa9"',
                    '(\\HasNoChildren) "/" "Café/日本"'.encode()]
    assert utf8lib.untagged_responses.pop("STATUS") == [
        b'"Caf\xc3\xa9" (MESSAGES 0)', '"Café/日本" (MESSAGES 0)'.encode()]
    # A message the legacy client appends under the UTF-7 name is seen under the UTF-8 one.
    legacy.append(b"Subject: hi\r\n\r\nhello\r\n", folder="Café/日本".encode("imap4-utf-7").decode())
    typ, data = utf8lib.status('"Café/日本"', "(MESSAGES)")
    assert (typ, data) == ("OK", ['"Café/日本" (MESSAGES 1)'.encode()])
    assert utf8lib.select('"Café/日本"') == ("OK", [b"1"])
    # An ampersand is an ampersand in UTF-8 (no UTF-7 shift): "R&-D" to the legacy client.
    assert utf8lib.rename('"Ärger"', '"R&D"')[0] == "OK"
    names = listed(legacy.ok('LIST "" "*"'))
    assert b"R&-D" in names and "Ärger".encode("imap4-utf-7") not in names
    typ, data = utf8lib.copy("1", '"R&D"')
    assert typ == "OK"
    assert legacy.ok('STATUS "R&-D" (MESSAGES)') == [b"* STATUS R&-D (MESSAGES 1)"]


def test_malformed_utf8_mailbox_names_are_refused(modern):
    for wire, why in [(b"\xff\xfe", b"not valid UTF-8 (octet 1)"),
                      (b"caf\xc0\xa9", b"not valid UTF-8 (octet 4)"),  # overlong
                      (b"a\xed\xa0\x80", b"not valid UTF-8 (octet 2)"),  # a UTF-16 surrogate
                      (b"x\xc2\x85y", b"holds U+0085"),  # a C1 control
                      ("a\u2028b".encode(), b"holds U+2028")]:
        for command in (b"CREATE", b"SELECT", b"DELETE"):
            untagged, tagged = modern.command(b"%s {%d+}\r\n%s" % (command, len(wire), wire))
            assert tagged.startswith(b"NO [CANNOT] mailbox name ") and why in tagged, (wire, tagged)
    # A pattern that is not UTF-8 matches nothing (as a bad modified UTF-7 pattern).
    assert modern.ok(b'LIST "" "\xff*"') == []
    untagged, tagged = modern.command(b'CREATE "' + "é".encode() * 600 + b'"')
    assert tagged.startswith(b"NO [CANNOT] folder name must be 1.."), tagged
    modern.ok("NOOP")  # the session goes on


def test_legacy_client_may_not_send_utf8_names(legacy):
    untagged, tagged = legacy.command('CREATE "Café"'.encode())
    assert tagged.startswith(b"NO [CANNOT] mailbox name is not valid modified UTF-7")


def test_utf8_append_before_enable_is_bad(legacy):
    untagged, tagged = appendUtf8(legacy)
    assert tagged == (b"BAD Syntax error: APPEND with UTF8 data needs ENABLE UTF8=ACCEPT first "
                      b"(RFC 6855 section 4)")
    assert legacy.ok("STATUS INBOX (MESSAGES)") == [b"* STATUS INBOX (MESSAGES 0)"]


def test_utf8_append_and_fetch_as_stored(modern):
    untagged, tagged = appendUtf8(modern)
    assert tagged.startswith(b"OK [APPENDUID "), tagged
    # Synchronizing literal8 too, in a MULTIAPPEND with a plain message after it.
    modern.send(b"s1 APPEND INBOX (\\Seen) UTF8 (~{%d}\r\n" % len(MESSAGE))
    assert modern.line().startswith(b"+ ")
    modern.send(MESSAGE + b") {5}\r\n")
    assert modern.line().startswith(b"+ ")
    modern.send(b"a\r\n\r\n\r\n")
    assert modern.until(b"s1")[1].startswith(b"OK [APPENDUID ")
    modern.ok("SELECT INBOX")
    untagged = modern.ok("FETCH 1 (ENVELOPE BODY.PEEK[] BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    line = untagged[0]
    assert b"BODY[] {%d}\r\n" % len(MESSAGE) + MESSAGE in line
    assert b'"' + SUBJECT.encode() + b'"' in line  # ENVELOPE: UTF-8 in a quoted string
    assert b'("\xc3\x9c"' not in line
    assert b'(("J\xc3\xb6rg M\xc3\xbcller" NIL "j\xc3\xb6rg" "b\xc3\xbccher.example"))' in line
    assert ("Subject: " + SUBJECT + "\r\n\r\n").encode() in line
    # UIDs 1 and 2 carry the same message; 3 is the plain one.
    assert modern.ok("FETCH 2:3 (FLAGS RFC822.SIZE)") == [
        b"* 2 FETCH (FLAGS (\\Recent \\Seen) RFC822.SIZE %d)" % len(MESSAGE),
        b"* 3 FETCH (FLAGS (\\Recent) RFC822.SIZE 5)"]


def test_legacy_client_sees_a_downgraded_header(server, legacy, modern):
    assert appendUtf8(modern)[1].startswith(b"OK")
    legacy.ok("SELECT INBOX")
    line = legacy.ok("FETCH 1 (ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER] BODY.PEEK[])")[0]
    header = re.search(rb"BODY\[HEADER\] \{(\d+)\}\r\n", line)
    block = line[header.end():header.end() + int(header.group(1))]
    assert block.isascii() and block.endswith(b"\r\n\r\n")
    parsed = email.message_from_bytes(block, policy=policy.default)
    assert parsed["Subject"] == SUBJECT
    assert b"\r\nContent-Type: text/plain; charset=utf-8\r\n" in block  # ASCII fields as they were
    # No ASCII form of jörg@ exists: an empty group named after the original address.
    assert str(parsed["From"]) == '"Jörg Müller <jörg@bücher.example>":;'
    assert str(parsed["To"]) == "Ann <ann@xn--bcher-kva.example>, bob@example.test"
    # The body is as stored (8bit, declared so); only the header fields changed.
    body = re.search(rb"BODY\[\] \{(\d+)\}\r\n", line)
    whole = line[body.end():body.end() + int(body.group(1))]
    assert whole == block + MESSAGE.split(b"\r\n\r\n", 1)[1]
    envelope = line[line.index(b"ENVELOPE"):line.index(b"BODY")]
    assert envelope.isascii()
    assert b'"=?utf-8?b?' in envelope and b'"xn--bcher-kva.example"' in envelope
    assert b'(NIL NIL "=?utf-8?b?' in envelope and b"(NIL NIL NIL NIL)" in envelope  # the group
    # A UTF-8 session on the same message still gets it as stored.
    modern.ok("SELECT INBOX")
    assert MESSAGE in modern.ok("FETCH 1 BODY.PEEK[]")[0]


def test_search_finds_utf8_header_text(legacy, modern, utf8lib):
    assert appendUtf8(modern)[1].startswith(b"OK")
    legacy.append(b"Subject: plain\r\n\r\nnothing\r\n")
    legacy.ok("SELECT INBOX")
    word = "日本".encode()
    assert legacy.ok(b"SEARCH CHARSET UTF-8 SUBJECT {%d+}\r\n%s" % (len(word), word)) == [
        b"* SEARCH 1"]
    assert legacy.ok(b"SEARCH CHARSET UTF-8 FROM {5+}\r\nj\xc3\xb6rg") == [b"* SEARCH 1"]
    # After ENABLE UTF8=ACCEPT the strings are UTF-8 without a CHARSET (RFC 6855 §3).
    assert utf8lib.select("INBOX")[0] == "OK"
    assert utf8lib.search(None, "SUBJECT", '"Köln"') == ("OK", [b"1"])
    assert utf8lib.search(None, "TO", '"ann@bücher"') == ("OK", [b"1"])
    assert utf8lib.search(None, "SUBJECT", '"plain"') == ("OK", [b"2"])
    # RFC 6855 §3: a charset other than UTF-8 conflicts with UTF8=ACCEPT (SHOULD be BAD);
    # CHARSET UTF-8 (or US-ASCII, a subset) says nothing new and is accepted.
    modern.ok("SELECT INBOX")
    assert modern.command("SEARCH CHARSET ISO-8859-1 SUBJECT x")[1] == (
        b"BAD CHARSET conflicts with UTF8=ACCEPT: strings are UTF-8")
    assert modern.ok(b'SEARCH CHARSET UTF-8 SUBJECT "K\xc3\xb6ln"') == [b"* SEARCH 1"]
    assert legacy.command("SEARCH CHARSET ISO-8859-1 SUBJECT x")[1].startswith(b"NO [BADCHARSET")


@pytest.mark.interop
def test_neomutt_enables_utf8_and_reads_a_utf8_folder(server, legacy, tmp_path):
    """neomutt (a UTF-8 locale) sends ENABLE UTF8=ACCEPT, opens a folder a modified UTF-7
    client created by its UTF-8 name, and copies the message out as stored, undowngraded."""
    from test_interop import requireTool, run

    binary = requireTool("neomutt", "neomutt")
    script = requireTool("script", "bsdutils")  # gives neomutt the terminal it insists on
    utf7 = "Café/日本".encode("imap4-utf-7")
    legacy.ok(b"CREATE " + utf7)
    legacy.append(MESSAGE, folder=utf7.decode())
    out = tmp_path / "copied.mbox"
    rc = tmp_path / "muttrc"
    rc.write_text(
        f'set imap_user="alice@example.test"\nset imap_pass="secret"\nset ssl_starttls=no\n'
        f'set ssl_force_tls=no\nset folder="imap://127.0.0.1:{server.imapPort}/"\n'
        f'set charset="utf-8"\nset mbox_type=mbox\nset confirmappend=no\n'
        f"set confirmcreate=no\nset quit=yes\nset move=no\nset mail_check=0\n", encoding="utf-8")
    keys = f"<tag-pattern>~A<enter><tag-prefix><copy-message>{out}<enter><quit>"
    command = (f"{binary} -n -F {rc} -f 'imap://127.0.0.1:{server.imapPort}/Café/日本' "
               f"-e 'push \"{keys}\"'")
    result = run([script, "-qec", command, "/dev/null"],
                 env=dict(os.environ, TERM="xterm", HOME=str(tmp_path), LANG="C.UTF-8",
                          LC_ALL="C.UTF-8"))
    assert result.returncode == 0, result.stdout[-2000:]
    copied = out.read_bytes()
    # Raw UTF-8, as stored: a session without UTF8=ACCEPT would have got encoded-words.
    assert ("Subject: " + SUBJECT + "\n").encode() in copied, copied[:2000]
    assert "From: \"Jörg Müller\" <jörg@bücher.example>\n".encode() in copied, copied[:2000]


def test_legacy_client_sees_downgraded_part_headers(legacy, modern):
    """The header of an attached message and a part's MIME header, fetched on their own."""
    attached = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n"
                b"Subject: fwd\r\n\r\n--b\r\n"
                + 'Content-Type: text/plain; name="Grüße.txt"\r\n\r\nhi\r\n'.encode()
                + b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + MESSAGE + b"\r\n--b--\r\n")
    assert appendUtf8(modern, attached)[1].startswith(b"OK")
    legacy.ok("SELECT INBOX")
    line = legacy.ok("FETCH 1 (BODY.PEEK[1.MIME] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] "
                     "BODYSTRUCTURE)")[0]
    mime = re.search(rb"BODY\[1\.MIME\] \{(\d+)\}\r\n", line)
    assert line[mime.end():mime.end() + int(mime.group(1))] == (
        b"Content-Type: text/plain; name*=utf-8''Gr%C3%BC%C3%9Fe.txt\r\n\r\n")
    header = re.search(rb"BODY\[2\.HEADER\] \{(\d+)\}\r\n", line)
    block = line[header.end():header.end() + int(header.group(1))]
    assert block.isascii()
    assert email.message_from_bytes(block, policy=policy.default)["Subject"] == SUBJECT
    text = re.search(rb"BODY\[2\.TEXT\] \{(\d+)\}\r\n", line)
    assert line[text.end():text.end() + int(text.group(1))] == "Hallo, schöne Grüße.\r\n".encode()
    structure = line[line.index(b"BODYSTRUCTURE"):]
    assert structure.isascii() and b'"NAME" "=?utf-8?b?' in structure
    # Fetched whole, the attached message is as stored (not downgraded: see downgrade.py).
    modern.ok("SELECT INBOX")
    assert b"BODY[2] {%d}\r\n" % len(MESSAGE) + MESSAGE in modern.ok("FETCH 1 BODY.PEEK[2]")[0]


def test_nul_octets_are_sent_as_0x80(modern):
    """RFC 3501 §4.3: no NUL in a literal; a binary message (BINARYMIME, literal8) keeps its size."""
    binary = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\xff\x00\r\n"
    assert appendUtf8(modern, binary)[1].startswith(b"OK")
    modern.ok("SELECT INBOX")
    line = modern.ok("FETCH 1 (RFC822.SIZE BODY.PEEK[] BODY.PEEK[TEXT])")[0]
    assert b"RFC822.SIZE %d " % len(binary) in line
    assert b"BODY[] {%d}\r\n" % len(binary) + binary.replace(b"\x00", b"\x80") in line
    assert b"BODY[TEXT] {6}\r\n\x80\x01\xff\x80\r\n" in line
