"""LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819) and STATUS=SIZE (RFC 8438), on every backend."""

from __future__ import annotations

import re

import pytest
from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend

MESSAGE = b"From: a@remote.test\r\nSubject: s\r\n\r\nhello\r\n"


@pytest.fixture
def imap(server):
    with loggedIn(server.imapPort) as client:
        yield client


def listed(untagged: list[bytes]) -> dict[str, tuple[set[str], bytes]]:
    """name -> (attributes, extended data) of each LIST line."""
    out = {}
    for line in untagged:
        if not line.startswith(b"* LIST "):
            continue
        m = re.fullmatch(rb'\* LIST \(([^)]*)\) "/" ("[^"]*"|[^ ]+)( .*)?', line)
        assert m, line
        out[m.group(2).strip(b'"').decode()] = (set(m.group(1).decode().split()),
                                                (m.group(3) or b"").strip())
    return out


def capabilities(imap) -> set[bytes]:
    [line] = imap.ok("CAPABILITY")
    return set(line.split()[2:])


def test_capabilities_advertised(imap):
    assert {b"LIST-EXTENDED", b"LIST-STATUS", b"STATUS=SIZE"} <= capabilities(imap)


def test_selection_subscribed_lists_nonexistent_and_subscribed(imap):
    imap.ok("CREATE Kept")
    imap.ok("CREATE Other")
    imap.ok("SUBSCRIBE Kept")
    imap.ok("CREATE Gone")
    imap.ok("SUBSCRIBE Gone")
    imap.ok("DELETE Gone")
    got = listed(imap.ok('LIST (SUBSCRIBED) "" "*"'))
    assert "Other" not in got
    assert got["Kept"][0] >= {"\\Subscribed"}
    assert got["Gone"][0] >= {"\\Subscribed", "\\NonExistent"}
    # RETURN (SUBSCRIBED) marks without filtering.
    got = listed(imap.ok('LIST "" "*" RETURN (SUBSCRIBED)'))
    assert "\\Subscribed" in got["Kept"][0] and "\\Subscribed" not in got["Other"][0]
    assert "Gone" not in got


def test_recursivematch_gives_childinfo(imap):
    imap.ok("CREATE Lists/Python")
    imap.ok("CREATE Lists/Rust")
    imap.ok("CREATE Plain")
    imap.ok("SUBSCRIBE Lists/Python")
    got = listed(imap.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)'))
    assert got["Lists"] == ({"\\HasChildren"}, b'("CHILDINFO" ("SUBSCRIBED"))')
    assert "Plain" not in got
    # Without RECURSIVEMATCH the unsubscribed parent is not listed.
    assert "Lists" not in listed(imap.ok('LIST (SUBSCRIBED) "" "%"'))
    # RECURSIVEMATCH alone is a syntax error (RFC 5258 §3.1), as is an unknown option.
    assert imap.command('LIST (RECURSIVEMATCH) "" "%"')[1].startswith(b"BAD")
    assert imap.command('LIST (BOGUS) "" "%"')[1].startswith(b"BAD")
    assert imap.command('LIST "" "%" RETURN (BOGUS)')[1].startswith(b"BAD")


def test_remote_and_multiple_patterns(imap):
    imap.ok("CREATE Alpha")
    imap.ok("CREATE Beta")
    imap.ok("CREATE Gamma")
    got = listed(imap.ok('LIST (REMOTE) "" ("Alpha" "Gam*")'))
    assert set(got) == {"Alpha", "Gamma"}


def test_list_status_returns_status_after_each_selectable_folder(imap):
    imap.ok("CREATE Work")
    imap.append(MESSAGE, folder="Work")
    imap.append(MESSAGE, flags="\\Seen", folder="Work")
    untagged = imap.ok('LIST "" "Work" RETURN (STATUS (MESSAGES UNSEEN SIZE))')
    assert untagged[0].startswith(b"* LIST ")
    assert untagged[1] == b"* STATUS Work (MESSAGES 2 UNSEEN 1 SIZE %d)" % (2 * len(MESSAGE))
    assert imap.command('LIST "" "Work" RETURN (STATUS (BOGUS))')[1].startswith(b"BAD")


def test_list_status_skips_nonexistent(imap):
    imap.ok("CREATE Gone")
    imap.ok("SUBSCRIBE Gone")
    imap.ok("DELETE Gone")
    untagged = imap.ok('LIST (SUBSCRIBED) "" "Gone" RETURN (STATUS (MESSAGES))')
    assert len(untagged) == 1 and b"\\NonExistent" in untagged[0]


def test_status_size(imap):
    imap.append(MESSAGE)
    imap.append(MESSAGE + b"more\r\n")
    [line] = imap.ok("STATUS INBOX (MESSAGES SIZE)")
    assert line == b"* STATUS INBOX (MESSAGES 2 SIZE %d)" % (2 * len(MESSAGE) + 6)
