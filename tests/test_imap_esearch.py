"""ESEARCH (RFC 4731) and SEARCHRES (RFC 5182) over loopback, on every backend."""

from __future__ import annotations

import imaplib
import re

import pytest
from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend

from twistmail.protocols.imap import esearch
from twistmail.protocols.imap.parser import Arguments, ParseError


def message(n: int) -> bytes:
    return b"From: s@remote.test\r\nSubject: number %d\r\n\r\nbody %d\r\n" % (n, n)


def tagless(untagged: list[bytes]) -> list[bytes]:
    """The responses, with each ESEARCH's (TAG "tN") written as (TAG)."""
    return [re.sub(rb'^\* ESEARCH \(TAG "t\d+"\)', b"* ESEARCH (TAG)", u) for u in untagged]


def filled(port: int, count: int = 6):
    client = loggedIn(port)
    for n in range(1, count + 1):
        client.append(message(n), "\\Seen" if n % 2 else "")
    client.ok("SELECT INBOX")
    return client


def test_capabilities_are_advertised(server):
    client = loggedIn(server.imapPort)
    (capability,) = client.ok("CAPABILITY")
    assert b" ESEARCH" in capability and b" SEARCHRES" in capability


def test_search_return_options(server):
    client = filled(server.imapPort)
    client.ok("STORE 1 +FLAGS (\\Deleted)")
    client.ok("EXPUNGE")  # uids 2..6 are now numbers 1..5
    assert tagless(client.ok("SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN")) == [
        b'* ESEARCH (TAG) MIN 1 MAX 5 ALL 1,3,5 COUNT 3']
    assert tagless(client.ok("UID SEARCH RETURN (MIN COUNT) UNSEEN")) == [
        b'* ESEARCH (TAG) UID MIN 2 COUNT 3']
    assert tagless(client.ok("SEARCH RETURN () ALL")) == [b'* ESEARCH (TAG) ALL 1:5']
    # Nothing found: no MIN, MAX or ALL; COUNT is 0.
    assert tagless(client.ok("SEARCH RETURN (MIN MAX ALL COUNT) KEYWORD none")) == [
        b'* ESEARCH (TAG) COUNT 0']
    assert tagless(client.ok("SEARCH RETURN (MIN) KEYWORD none")) == [b'* ESEARCH (TAG)']
    # Without RETURN, the RFC 3501 answer.
    assert client.ok("SEARCH UNSEEN") == [b"* SEARCH 1 3 5"]
    client.send(b"x.1 SEARCH RETURN (COUNT) ALL\r\n")
    assert client.until(b"x.1") == ([b'* ESEARCH (TAG "x.1") COUNT 5'], b"OK SEARCH completed")
    untagged, tagged = client.command("SEARCH RETURN (BOGUS) ALL")
    assert tagged.startswith(b"BAD") and not untagged


def test_saved_result_is_used_by_later_commands(server):
    client = filled(server.imapPort)
    assert client.ok("SEARCH RETURN (SAVE) UNSEEN") == []  # SAVE alone: no ESEARCH
    fetched = client.ok("FETCH $ (UID)")
    assert fetched == [b"* 2 FETCH (UID 2)", b"* 4 FETCH (UID 4)", b"* 6 FETCH (UID 6)"]
    assert client.ok("UID FETCH $ (FLAGS)")[0] == b"* 2 FETCH (UID 2 FLAGS (\\Recent))"
    client.ok("STORE $ +FLAGS.SILENT (\\Flagged)")
    assert client.ok("SEARCH FLAGGED") == [b"* SEARCH 2 4 6"]
    assert client.ok("SEARCH $ 1:4") == [b"* SEARCH 2 4"]
    assert client.ok("UID SEARCH OR $ 1") == [b"* SEARCH 1 2 4 6"]
    # MIN/MAX without ALL or COUNT: only those are saved (RFC 5182 §2.1).
    assert tagless(client.ok("SEARCH RETURN (SAVE MIN MAX) FLAGGED")) == [
        b'* ESEARCH (TAG) MIN 2 MAX 6']
    assert client.ok("FETCH $ UID") == [b"* 2 FETCH (UID 2)", b"* 6 FETCH (UID 6)"]
    client.ok("COPY $ INBOX")
    # An empty saved result: the commands succeed and do nothing.
    client.ok("SEARCH RETURN (SAVE) KEYWORD none")
    assert client.ok("FETCH $ UID") == []
    assert client.ok("UID SEARCH $") == [b"* SEARCH"]


def test_saved_result_follows_expunges_and_resets_on_select(server):
    client = filled(server.imapPort)
    other = loggedIn(server.imapPort)
    other.ok("SELECT INBOX")
    client.ok("SEARCH RETURN (SAVE) 2:5")
    other.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
    other.ok("EXPUNGE")
    client.ok("NOOP")
    assert client.ok("FETCH $ UID") == [b"* 2 FETCH (UID 2)", b"* 3 FETCH (UID 4)",
                                       b"* 4 FETCH (UID 5)"]
    client.ok("UID STORE $ +FLAGS.SILENT (\\Deleted)")
    client.ok("UID EXPUNGE $")
    assert client.ok("SEARCH ALL") == [b"* SEARCH 1 2"]
    client.ok("SEARCH RETURN (SAVE) ALL")
    client.ok("EXAMINE INBOX")
    assert client.ok("FETCH $ UID") == []  # reset by SELECT/EXAMINE
    # $ in the SEARCH that saves is the result saved before.
    client.ok("SEARCH RETURN (SAVE) 1:2")
    client.ok("SEARCH RETURN (SAVE) $ 2:*")
    assert client.ok("FETCH $ UID") == [b"* 2 FETCH (UID 6)"]
    # A SEARCH ... SAVE answered BAD changes nothing; one answered NO empties it.
    assert client.command("SEARCH RETURN (SAVE) NOSUCHKEY")[1].startswith(b"BAD")
    assert client.ok("FETCH $ UID") == [b"* 2 FETCH (UID 6)"]
    untagged, tagged = client.command("SEARCH RETURN (SAVE) CHARSET KOI8-R ALL")
    assert tagged.startswith(b"NO [BADCHARSET")
    assert client.ok("FETCH $ UID") == []


def test_imaplib_client(server):
    client = imaplib.IMAP4("127.0.0.1", server.imapPort)
    try:
        client.login("alice@example.test", "secret")
        for n in range(1, 4):
            client.append("INBOX", "", None, message(n))
        client.select("INBOX")
        typ, data = client.search(None, "RETURN", "(COUNT)", "ALL")
        assert typ == "OK"
        assert client.untagged_responses.get("ESEARCH") or data  # imaplib keeps it untagged
    finally:
        client.logout()


@pytest.mark.parametrize("text", [b"RETURN (MIN", b"RETURN (NOPE) ALL", b"RETURN MIN ALL"])
def test_bad_return_syntax(text):
    with pytest.raises(ParseError):
        esearch.parseReturn(Arguments([text]))
