"""CONDSTORE and QRESYNC (RFC 7162, issue 12 §3), over loopback, on every backend.

What Thunderbird, iOS Mail and K-9 do with them: remember HIGHESTMODSEQ,
and on reconnect ask only for what changed since (FETCH CHANGEDSINCE, or
SELECT (QRESYNC ...) with VANISHED (EARLIER) for what went), and store flags
only if nobody changed them meanwhile (UNCHANGEDSINCE, MODIFIED).
"""

from __future__ import annotations

import imaplib
import re

from imapwire import RawIMAP, loggedIn
from support import addUser, everyBackend, startServer  # noqa: F401 - every backend
from test_imap_concurrency import together
from test_plugins import examplePlugin  # noqa: F401 - the fixture

from twistmail.storage import _modseq


def message(n: int) -> bytes:
    return b"From: s@remote.test\r\nSubject: m%d\r\nMessage-ID: <%d@remote.test>\r\n\r\nbody\r\n" % (n, n)


def code(untagged: list[bytes], name: bytes) -> int:
    """The value of response code C{name} (HIGHESTMODSEQ, UIDVALIDITY) in untagged OKs."""
    for line in untagged:
        m = re.match(rb"\* OK \[%s (\d+)\]" % name, line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no {name!r} in {untagged!r}")


def fetched(untagged: list[bytes]) -> dict[int, tuple[bytes, int]]:
    """{uid: (flags, modseq)} of the FETCH responses."""
    out = {}
    for line in untagged:
        m = re.match(rb"\* \d+ FETCH \(UID (\d+) FLAGS \(([^)]*)\) MODSEQ \((\d+)\)\)", line)
        if m:
            out[int(m.group(1))] = (m.group(2), int(m.group(3)))
    return out


def modseqOf(client: RawIMAP, seq: int) -> int:
    (line,) = [u for u in client.ok(f"FETCH {seq} (MODSEQ)") if b"MODSEQ" in u]
    return int(re.search(rb"MODSEQ \((\d+)\)", line).group(1))


def withMessages(server, count: int) -> RawIMAP:
    client = loggedIn(server.imapPort)
    for n in range(1, count + 1):
        client.append(message(n))
    return client


def watchedAndChanged(server, count: int, enable: str | None = None,
                      select: str = "SELECT INBOX") -> tuple[RawIMAP, RawIMAP]:
    """A session with C{enable} on and INBOX selected, and another on INBOX to change it."""
    mine = withMessages(server, count)
    if enable:
        mine.ok(f"ENABLE {enable}")
    mine.ok(select)
    other = loggedIn(server.imapPort)
    other.ok("SELECT INBOX")
    return mine, other


def test_capabilities_and_enable(server):
    client = loggedIn(server.imapPort)
    (caps,) = [u for u in client.ok("CAPABILITY") if u.startswith(b"* CAPABILITY")]
    assert b" CONDSTORE" in caps and b" QRESYNC" in caps
    assert client.ok("ENABLE QRESYNC") == [b"* ENABLED QRESYNC"]
    assert client.ok("ENABLE QRESYNC CONDSTORE") == [b"* ENABLED"]  # already on (RFC 5161)


def test_select_condstore_fetch_modseq_and_status(server):
    client = withMessages(server, 3)
    (status,) = client.ok("STATUS INBOX (HIGHESTMODSEQ MESSAGES)")
    highest = int(re.search(rb"HIGHESTMODSEQ (\d+)", status).group(1))
    untagged = client.ok("SELECT INBOX (CONDSTORE)")
    assert code(untagged, b"HIGHESTMODSEQ") == highest >= 1
    lines = [u for u in client.ok("FETCH 1:* (UID MODSEQ)") if b"FETCH" in u]
    modseqs = [int(re.search(rb"MODSEQ \((\d+)\)", u).group(1)) for u in lines]
    assert len(modseqs) == 3 and max(modseqs) == highest and modseqs == sorted(modseqs)
    untagged = client.ok("STORE 2 +FLAGS (\\Flagged)")
    assert re.search(rb"^\* 2 FETCH \(FLAGS \([^)]*\) MODSEQ \((\d+)\)\)$", untagged[-1]), untagged
    assert modseqOf(client, 2) > highest
    (status,) = client.ok("STATUS INBOX (HIGHESTMODSEQ)")
    assert status.endswith(b"(HIGHESTMODSEQ %d)" % modseqOf(client, 2))


def test_fetch_changedsince_answers_only_what_changed(server):
    client, other = watchedAndChanged(server, 5)
    mark = modseqOf(client, 5)
    other.ok("STORE 2,4 +FLAGS (\\Seen)")
    client.ok("NOOP")
    untagged = client.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {mark})")
    assert sorted(fetched(untagged)) == [2, 4]
    assert all(modseq > mark for _, modseq in fetched(untagged).values())
    assert [u for u in client.ok(f"FETCH 1:3 (FLAGS) (CHANGEDSINCE {mark})") if b"FETCH" in u] == \
        [b"* 2 FETCH (FLAGS (\\Recent \\Seen) MODSEQ (%d))" % fetched(untagged)[2][1]]
    highest = max(m for _, m in fetched(untagged).values())
    assert [u for u in client.ok(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})") if b"FETCH" in u] == []


def test_store_unchangedsince_reports_modified_and_changes_nothing_of_them(server):
    mine, other = watchedAndChanged(server, 3, select="SELECT INBOX (CONDSTORE)")
    mark = modseqOf(mine, 3)
    other.ok("STORE 2 +FLAGS ($Other)")  # meanwhile, in another session
    tagged = mine.command(f"STORE 1:3 (UNCHANGEDSINCE {mark}) +FLAGS.SILENT (\\Seen)")
    assert tagged[1].startswith(b"OK [MODIFIED 2] "), tagged
    silent = [u for u in tagged[0] if re.match(rb"\* [13] FETCH", u)]
    assert len(silent) == 2 and all(re.fullmatch(rb"\* \d FETCH \(MODSEQ \(\d+\)\)", u) for u in silent)
    flags = {int(u.split()[1]): u for u in mine.ok("FETCH 1:3 (FLAGS)") if b"FETCH" in u}
    assert b"\\Seen" in flags[1] and b"\\Seen" in flags[3] and b"\\Seen" not in flags[2]
    tagged = mine.command(b"UID STORE 2 (UNCHANGEDSINCE 1) -FLAGS ($Other)")
    assert tagged[1].startswith(b"OK [MODIFIED 2] ")


def test_flag_updates_from_other_sessions_carry_modseq_once_enabled(server):
    mine, other = watchedAndChanged(server, 2, "CONDSTORE")
    other.ok("STORE 1 +FLAGS (\\Answered)")
    update = [u for u in mine.ok("NOOP") if b"FETCH" in u]
    assert len(update) == 1 and re.fullmatch(
        rb"\* 1 FETCH \(UID 1 FLAGS \(\\Answered \\Recent\) MODSEQ \(\d+\)\)", update[0]), update


def test_search_modseq(server):
    client = withMessages(server, 4)
    client.ok("SELECT INBOX")
    mark = modseqOf(client, 4)
    client.ok("STORE 2 +FLAGS (\\Flagged)")
    untagged = client.ok(f"SEARCH MODSEQ {mark + 1}")
    assert untagged == [b"* SEARCH 2 (MODSEQ %d)" % modseqOf(client, 2)]
    untagged = client.ok(f'UID SEARCH MODSEQ "/flags/\\\\Flagged" all {mark + 1} FLAGGED')
    assert untagged == [b"* SEARCH 2 (MODSEQ %d)" % modseqOf(client, 2)]
    assert client.ok(f"SEARCH MODSEQ {modseqOf(client, 2) + 1}") == [b"* SEARCH"]


def test_qresync_after_reconnect_sees_exactly_the_changes(server):
    """The client's cache is as of its last session; another session then flags one,
    expunges one and appends one: the resync reports exactly those."""
    first = withMessages(server, 5)
    untagged = first.ok("SELECT INBOX (CONDSTORE)")
    validity, mark = code(untagged, b"UIDVALIDITY"), code(untagged, b"HIGHESTMODSEQ")
    first.ok("LOGOUT")
    other = loggedIn(server.imapPort)
    other.ok("SELECT INBOX")
    other.ok("UID STORE 2 +FLAGS (\\Seen)")
    other.ok("UID STORE 4 +FLAGS (\\Deleted)")
    other.ok("EXPUNGE")
    other.append(message(6))
    client = loggedIn(server.imapPort)
    client.ok("ENABLE QRESYNC")
    untagged = client.ok(f"SELECT INBOX (QRESYNC ({validity} {mark}))")
    assert [u for u in untagged if u.startswith(b"* VANISHED")] == [b"* VANISHED (EARLIER) 4"]
    changes = fetched(untagged)
    assert sorted(changes) == [2, 6] and changes[2][0] == b"\\Seen"
    assert code(untagged, b"HIGHESTMODSEQ") == max(m for _, m in changes.values())
    # With known UIDs: only those are reported as vanished.
    client.ok("ENABLE QRESYNC")
    untagged = client.ok(f"SELECT INBOX (QRESYNC ({validity} {mark} 1:3))")
    assert [u for u in untagged if u.startswith(b"* VANISHED")] == []
    assert b"* OK [CLOSED] Previous mailbox closed" in untagged  # RFC 7162 §3.2.11
    # A stale UIDVALIDITY: no resync data, the client starts over.
    untagged = client.ok(f"SELECT INBOX (QRESYNC ({validity + 1} {mark}))")
    assert not [u for u in untagged if u.startswith(b"* VANISHED") or b"FETCH" in u]


def test_qresync_with_imaplib(server):
    withMessages(server, 3).ok("LOGOUT")
    client = imaplib.IMAP4("127.0.0.1", server.imapPort)
    try:
        client.login("alice@example.test", "secret")
        client.enable("QRESYNC")
        assert client.select("INBOX")[0] == "OK"
        validity = int(client.untagged_responses["UIDVALIDITY"][-1])
        mark = int(client.untagged_responses["HIGHESTMODSEQ"][-1])
        client.uid("STORE", "3", "+FLAGS", "(\\Deleted)")
        client.expunge()
        typ, data = client._simple_command("SELECT", "INBOX", f"(QRESYNC ({validity} {mark}))")
        assert typ == "OK"
        assert client.untagged_responses["VANISHED"][-1] == b"(EARLIER) 3"
    finally:
        client.logout()


def test_vanished_replaces_expunge_once_qresync_is_enabled(server):
    mine, other = watchedAndChanged(server, 4, "QRESYNC")
    other.ok("STORE 2:3 +FLAGS (\\Deleted)")
    other.ok("EXPUNGE")
    untagged = mine.ok("NOOP")
    assert b"* VANISHED 2:3" in untagged and not [u for u in untagged if u.endswith(b"EXPUNGE")]
    untagged = mine.ok("STORE 2 +FLAGS (\\Deleted)")  # now the message with UID 4
    assert mine.ok("EXPUNGE") == [b"* VANISHED 4"]


def test_uid_fetch_changedsince_vanished(server):
    client = withMessages(server, 5)
    client.ok("ENABLE QRESYNC")
    client.ok("SELECT INBOX")
    mark = modseqOf(client, 5)
    client.ok("UID STORE 1,5 +FLAGS (\\Deleted)")
    client.ok("EXPUNGE")
    client.ok("UID STORE 3 +FLAGS (\\Seen)")
    untagged = client.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {mark} VANISHED)")
    assert untagged[0] == b"* VANISHED (EARLIER) 1,5"
    assert sorted(fetched(untagged)) == [3]
    untagged = client.ok(f"UID FETCH 2:4 (FLAGS) (CHANGEDSINCE {mark} VANISHED)")
    assert not [u for u in untagged if u.startswith(b"* VANISHED")]
    assert client.command(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {mark} VANISHED)")[1].startswith(b"BAD")


def test_qresync_falls_back_to_known_uids_when_expunges_are_forgotten(server, monkeypatch):
    monkeypatch.setattr(_modseq, "MAX_TOMBSTONES", 2)
    client = withMessages(server, 8)
    client.ok("ENABLE QRESYNC")
    untagged = client.ok("SELECT INBOX")
    validity, mark = code(untagged, b"UIDVALIDITY"), code(untagged, b"HIGHESTMODSEQ")
    for uid in (2, 3, 5, 7):
        client.ok(f"UID STORE {uid} +FLAGS (\\Deleted)")
        client.ok("EXPUNGE")
    untagged = client.ok(f"SELECT INBOX (QRESYNC ({validity} {mark} 1:6))")
    # Only two expunges are remembered: every known UID not there now is reported.
    assert [u for u in untagged if u.startswith(b"* VANISHED")] == [b"* VANISHED (EARLIER) 2:3,5"]
    untagged = client.ok(f"SELECT INBOX (QRESYNC ({validity} {mark}))")
    assert [u for u in untagged if u.startswith(b"* VANISHED")] == [b"* VANISHED (EARLIER) 2:3,5,7"]


def test_protocol_errors(server):
    client = withMessages(server, 2)
    assert client.command("SELECT INBOX (QRESYNC (1 1))")[1].startswith(b"BAD")  # not enabled
    client.ok("SELECT INBOX")
    for bad in ["FETCH 1 (FLAGS) (CHANGEDSINCE 0)", "FETCH 1 (FLAGS) (CHANGEDSINCE x)",
                "FETCH 1 (FLAGS) (CHANGEDSINCE 99999999999999999999999)",
                "FETCH 1 (FLAGS) (VANISHED)", "FETCH 1 (FLAGS) ()", "FETCH 1 (FLAGS) (FOO 1)",
                "STORE 1 (UNCHANGEDSINCE) +FLAGS (\\Seen)", "STORE 1 (FOO 1) +FLAGS (\\Seen)",
                "SEARCH MODSEQ", "SEARCH MODSEQ \"x\" bogus 5", "SELECT INBOX (BOGUS)"]:
        assert client.command(bad)[1].startswith(b"BAD"), bad
    assert client.command("NOOP")[1].startswith(b"OK")


def test_concurrent_sessions_resync_to_the_same_state(server):
    """Six sessions change flags and expunge at once; afterwards a QRESYNC from the old
    state gives every observer the same flags as a full FETCH."""
    setup = withMessages(server, 24)
    untagged = setup.ok("SELECT INBOX (CONDSTORE)")
    validity, mark = code(untagged, b"UIDVALIDITY"), code(untagged, b"HIGHESTMODSEQ")

    def work(i: int):
        client = loggedIn(server.imapPort)
        client.ok("SELECT INBOX")
        client.ok(f"UID STORE {i * 4 + 1}:{i * 4 + 3} +FLAGS ($K{i})")
        client.ok(f"UID STORE {i * 4 + 4} +FLAGS (\\Deleted)")
        client.ok(f"UID EXPUNGE {i * 4 + 4}")
        client.ok("LOGOUT")

    assert together(6, work) == [None] * 6
    client = loggedIn(server.imapPort)
    client.ok("ENABLE QRESYNC")
    untagged = client.ok(f"SELECT INBOX (QRESYNC ({validity} {mark}))")
    assert [u for u in untagged if u.startswith(b"* VANISHED")] == [
        b"* VANISHED (EARLIER) 4,8,12,16,20,24"]
    changes = fetched(untagged)
    assert sorted(changes) == [u for u in range(1, 25) if u % 4]
    full = {int(re.search(rb"UID (\d+)", u).group(1)): u for u in client.ok("UID FETCH 1:* (FLAGS)")
            if b"FETCH" in u}
    for uid, (flags, _) in changes.items():
        assert b"FLAGS (%s)" % flags in full[uid]


def test_modseqs_survive_a_restart(server, dataDir, backend):
    client = withMessages(server, 3)
    untagged = client.ok("SELECT INBOX (CONDSTORE)")
    client.ok("STORE 2 +FLAGS (\\Seen)")
    client.ok("STORE 3 +FLAGS (\\Deleted)")
    client.ok("EXPUNGE")
    validity = code(untagged, b"UIDVALIDITY")
    flagged = modseqOf(client, 2)
    (status,) = client.ok("STATUS INBOX (HIGHESTMODSEQ)")
    highest = int(re.search(rb"HIGHESTMODSEQ (\d+)", status).group(1))
    assert highest > flagged  # the expunge came last
    client.ok("LOGOUT")
    server.stop()
    again = startServer(dataDir, storage={"backend": backend})
    try:
        client = loggedIn(again.imapPort)
        client.ok("ENABLE QRESYNC")
        untagged = client.ok(f"SELECT INBOX (QRESYNC ({validity} {flagged - 1}))")
        assert code(untagged, b"HIGHESTMODSEQ") == highest
        assert [u for u in untagged if u.startswith(b"* VANISHED")] == [b"* VANISHED (EARLIER) 3"]
        assert sorted(fetched(untagged)) == [2] and fetched(untagged)[2][1] == flagged
        client.ok("STORE 1 +FLAGS (\\Seen)")
        assert modseqOf(client, 1) == highest + 1
    finally:
        again.stop()


def test_backend_without_modseqs_is_answered_nomodseq(examplePlugin, dataDir):  # noqa: F811
    """RFC 7162 §3.1.2.2: a plugin backend without IModSeqMailbox still serves IMAP."""
    addUser(dataDir, "alice@example.test")
    server = startServer(dataDir, storage={"backend": "example"})
    try:
        client = loggedIn(server.imapPort)
        client.append(message(1))
        untagged = client.ok("SELECT INBOX (CONDSTORE)")
        assert b"* OK [NOMODSEQ] No mod-sequences in this mailbox" in untagged
        assert not [u for u in untagged if b"HIGHESTMODSEQ" in u]
        for command in ["FETCH 1 (MODSEQ)", "FETCH 1 (FLAGS) (CHANGEDSINCE 1)",
                        "STORE 1 (UNCHANGEDSINCE 1) +FLAGS (\\Seen)", "SEARCH MODSEQ 1"]:
            assert client.command(command)[1].startswith(b"BAD"), command
        assert client.ok("STATUS INBOX (HIGHESTMODSEQ)")[0].endswith(b"(HIGHESTMODSEQ 0)")
        client.ok("STORE 1 +FLAGS (\\Seen)")
        assert b"\\Seen" in client.ok("FETCH 1 FLAGS")[0]
    finally:
        server.stop()

