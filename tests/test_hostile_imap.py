"""IMAP against a hostile (authenticated or not) client: cheap commands that were expensive.

Each test sends a command that cost the server a logged traceback, unbounded
memory, or minutes of CPU on the reactor thread (every other connection
frozen meanwhile), and checks for a clear answer instead.
"""

from __future__ import annotations

import pytest
from hostile import errors, logged  # noqa: F401 - logged is a fixture
from imapwire import RawIMAP
from test_imap_server import msg, send

HUGE = b"9" * 5000  # int() refuses more than 4300 digits


@pytest.fixture
def imap(server):
    send(server, msg(1), msg(2))
    client = RawIMAP(server.imapPort)
    client.login()
    client.ok("SELECT INBOX")
    yield client
    client.close()


@pytest.mark.parametrize("command", [
    b"FETCH " + HUGE + b" FLAGS", b"UID FETCH 1:" + HUGE + b" FLAGS",
    b"FETCH 1 BODY.PEEK[]<" + HUGE + b".10>", b"FETCH 1 BODY.PEEK[" + HUGE + b"]",
    b"SEARCH LARGER " + HUGE, b"SEARCH " + HUGE, b"SEARCH UID 1," + HUGE,
    b"UID EXPUNGE " + HUGE, b"STORE " + HUGE + b" +FLAGS (x)",
])
def test_numbers_of_thousands_of_digits_are_syntax_errors(imap, logged, command):  # noqa: F811
    """int() raised ValueError: NO [SERVERBUG] and a traceback in the log."""
    untagged, tagged = imap.command(command)
    assert tagged.startswith(b"BAD Syntax error: "), tagged
    imap.ok("NOOP")
    assert errors(logged) == []


@pytest.mark.parametrize("command", [b'LIST "" "\xff*"', b'LSUB "" "caf\xc3\xa9"',
                                     b'LIST "" ("INBOX" "\xe9")'])
def test_eight_bit_list_pattern_matches_nothing(imap, logged, command):  # noqa: F811
    """Twisted's imap4-utf-7 decoder raises on 8-bit octets even with errors="replace":
    that was a traceback; such a pattern matches nothing (test_imap_list has the rest)."""
    untagged, tagged = imap.command(command)
    assert tagged.startswith(b"OK "), tagged
    assert errors(logged) == []


def test_list_pattern_cannot_backtrack(imap):
    """LIST patterns were regexes (* -> .*): on a folder named aaa...a, a pattern of a
    few *a wildcards backtracked exponentially on the reactor thread (5 of them:
    half a minute; 8: hours), freezing every connection of the server."""
    imap.ok('CREATE "' + "a" * 190 + '"')
    untagged = imap.ok('LIST "" "' + "*a" * 8 + 'b"', timeout=5)
    assert untagged == []
    untagged = imap.ok('LIST "" "' + "%a" * 8 + '%"', timeout=5)
    assert [line[-190:] for line in untagged] == [b"a" * 190]
    untagged = imap.ok('LIST "" "' + "*" * 3000 + '"', timeout=5)
    assert any(line.endswith(b"a" * 190) for line in untagged)


def test_too_many_list_patterns(imap):
    untagged, tagged = imap.command(b'LIST "" (' + b"* " * 100 + b"*)")
    assert tagged.startswith(b"BAD Too many LIST patterns")


def test_duplicate_fetch_items_are_answered_once(imap):
    """A 64 KiB line holds 5,000 BODY.PEEK[]: each one was a copy of the message in
    one response built in memory (5,000 x 25 MB)."""
    [line] = imap.ok(b"FETCH 1 (" + b"BODY.PEEK[] " * 3000 + b"FLAGS)")
    assert line.count(b"BODY[] {") == 1 and line.count(b"FLAGS") == 1


def test_too_many_distinct_fetch_items(imap):
    items = b" ".join(b"BODY.PEEK[]<%d.10>" % n for n in range(101))
    untagged, tagged = imap.command(b"FETCH 1 (" + items + b")")
    assert tagged.startswith(b"BAD Syntax error: too many fetch attributes")


def test_overlapping_fetch_items_are_limited(server, logged):  # noqa: F811
    """Distinct but overlapping partials of one big message: NO [LIMIT] before the
    response grows past twice the message (plus 1 MiB)."""
    big = msg(1) + (b"x" * 998 + b"\r\n") * 200
    send(server, big)
    client = RawIMAP(server.imapPort)
    client.login()
    client.ok("SELECT INBOX")
    items = b" ".join(b"BODY.PEEK[]<%d.300000>" % n for n in range(20))
    untagged, tagged = client.command(b"FETCH 1 (" + items + b")")
    assert tagged.startswith(b"NO [LIMIT] "), tagged
    assert untagged == []
    items = b" ".join(b"BODY.PEEK[]<%d.300000>" % n for n in range(5))  # 1 MB: allowed
    [line] = client.ok(b"FETCH 1 (" + items + b")")
    assert line.count(b"BODY[]<") == 5
    client.close()
    assert errors(logged) == []


def test_too_many_search_keys(imap):
    """Every key runs for every message, the index-only ones on the reactor thread:
    16,000 ALLs fit in a line."""
    untagged, tagged = imap.command(b"SEARCH " + b"ALL " * 300 + b"ALL")
    assert tagged.startswith(b"BAD Syntax error: too many search keys")
    assert imap.ok(b"SEARCH " + b"ALL " * 200 + b"1,2,5:7")[-1] == b"* SEARCH 1 2"
    odd = b",".join(b"%d" % n for n in range(1, 20_000, 2))
    assert imap.ok(b"SEARCH " + odd)[-1] == b"* SEARCH 1"
    assert imap.ok(b"UID SEARCH NOT UID " + odd)[-1] == b"* SEARCH 2"


def test_fetch_batches_count_what_each_answer_repeats(server, monkeypatch):
    """A field list of 64 KiB repeated in the answer for every message: batches were
    cut by message size only, so 1 MiB of tiny messages rendered as gigabytes in one
    worker-thread batch before anything was sent."""
    from twistmail.protocols.imap import server as imapServer

    send(server, *(msg(n) for n in range(1, 61)))
    rendered: list[int] = []
    original = imapServer._renderBatch

    def recording(*args):
        lines = original(*args)
        rendered.append(sum(len(line) for line in lines if line))
        return lines

    monkeypatch.setattr(imapServer, "_renderBatch", recording)
    client = RawIMAP(server.imapPort)
    client.login()
    client.ok("SELECT INBOX")
    fields = b" ".join(b"X-Field-%05d" % n for n in range(4000))  # 56 KiB
    untagged = client.ok(b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (" + fields + b")])", timeout=30)
    assert len(untagged) == 60
    assert max(rendered) <= 2 * imapServer.READ_BATCH, rendered
    client.close()


def test_list_pattern_matcher_agrees_with_the_regex_it_replaced():
    """The bit-set matcher against the plain translation (* -> .*, % -> [^/]*) on short
    random patterns and names, where backtracking costs nothing."""
    import random
    import re

    from twistmail.protocols.imap.names import SEPARATOR, Pattern

    def reference(text: str, name: str) -> bool:
        if text[:5].upper() == "INBOX":
            if name[:5].upper() != "INBOX":
                return False
            text, name = text[5:], name[5:]
        rx = "".join(".*" if c == "*" else f"[^{re.escape(SEPARATOR)}]*" if c == "%"
                     else re.escape(c) for c in text)
        return re.fullmatch(rx, name, re.S) is not None

    rng = random.Random(5)
    for _ in range(20000):
        text = ("INBOX" if rng.random() < 0.1 else "") + "".join(
            rng.choice("ab/*%") for _ in range(rng.randint(0, 7)))
        name = ("inbox" if rng.random() < 0.1 else "") + "".join(
            rng.choice("ab/") for _ in range(rng.randint(0, 8)))
        assert Pattern(text).match(name) == reference(text, name), (text, name)
