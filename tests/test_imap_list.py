"""LIST, LSUB and SUBSCRIBE answers as RFC 3501 §6.3.8-9 and Dovecot give them (issue 12 §2),
on every backend."""

from __future__ import annotations

import re

import pytest
from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend


@pytest.fixture
def imap(server):
    with loggedIn(server.imapPort) as client:
        yield client


def names(untagged: list[bytes], verb: bytes = b"LIST") -> dict[str, set[str]]:
    out = {}
    for line in untagged:
        m = re.fullmatch(rb'\* ' + verb + rb' \(([^)]*)\) "/" (.+)', line)
        assert m, line
        wire = m.group(2)
        if wire.startswith(b'"'):
            wire = re.sub(rb'\\(.)', rb"\1", wire[1:-1])  # a quoted string's escapes
        out[wire.decode("imap4-utf-7")] = set(m.group(1).decode().split())
    return out


@pytest.mark.parametrize("command", [b'LIST "" "\xff*"', b'LSUB "" "caf\xc3\xa9"',
                                     b'LIST "" ("INBOX" "\xe9")', b'LIST "" "bad&-utf7&*"',
                                     b'LIST "&Jjo" "*"', b'LSUB "" "&AEE-*"'])
def test_pattern_not_modified_utf7_matches_nothing(imap, command):
    """Dovecot answers OK and lists nothing; BAD would make clients think the command is wrong."""
    untagged, tagged = imap.command(command)
    assert tagged.startswith(b"OK"), tagged
    # Only the valid pattern of a list matches.
    assert set(names(untagged)) == ({"INBOX"} if b"(" in command else set())


def test_reference_is_joined_to_the_pattern_by_concatenation(imap):
    imap.ok("CREATE foo/bar")
    imap.ok("CREATE foobar")
    imap.ok("CREATE other")
    assert set(names(imap.ok('LIST "foo" "*"'))) == {"foo", "foo/bar", "foobar"}
    assert set(names(imap.ok('LIST "foo/" "%"'))) == {"foo/bar"}
    assert set(names(imap.ok('LIST "fo" "o"'))) == {"foo"}


def test_lsub_percent_shows_a_subscribed_below_parent_as_noselect(imap):
    imap.ok("CREATE Lists/Python/Announce")
    imap.ok("SUBSCRIBE Lists/Python/Announce")
    assert names(imap.ok('LSUB "" "Lists"'), b"LSUB") == {"Lists": {"\\Noselect"}}
    assert names(imap.ok('LSUB "" "%"'), b"LSUB")["Lists"] == {"\\Noselect"}
    assert names(imap.ok('LSUB "Lists/" "%"'), b"LSUB") == {"Lists/Python": {"\\Noselect"}}
    every = names(imap.ok('LSUB "" "Lists*"'), b"LSUB")
    assert set(every) == {"Lists/Python/Announce"}
    assert "\\Noselect" not in every["Lists/Python/Announce"]
    imap.ok("SUBSCRIBE Lists")
    assert "\\Noselect" not in names(imap.ok('LSUB "" "%"'), b"LSUB")["Lists"]


def test_subscribe_to_a_folder_that_does_not_exist_is_refused(imap):
    _, tagged = imap.command("SUBSCRIBE Gone")
    assert tagged.startswith(b"NO [NONEXISTENT]"), tagged
    assert not any(line.endswith(b" Gone") for line in imap.ok('LSUB "" "*"'))
    imap.ok("CREATE Kept")
    imap.ok("SUBSCRIBE Kept")
    imap.ok("DELETE Kept")
    # A subscription outliving its folder can still be removed (as Dovecot).
    assert names(imap.ok('LSUB "" "Kept"'), b"LSUB") == {"Kept": {"\\Noselect"}}
    imap.ok("UNSUBSCRIBE Kept")
    assert imap.ok('LSUB "" "Kept"') == []


def test_folder_names_may_hold_backslash_percent_and_dot(server, imap):
    """Any character a Maildir++ or mbox name can carry (not control characters, not
    the separator) names a folder; on disk, '\\', '.', '%' are escaped (%5C, %2E, %25)."""
    import os

    wanted = ["a\\b", "Work\\Old/x.y", "100%", "dots.in.name"]
    for name in wanted:
        wire = name.replace("\\", "\\\\")
        imap.ok(f'CREATE "{wire}"')
        assert names(imap.ok(f'LIST "" "{wire}"')).keys() == {name}
        imap.ok(f'SUBSCRIBE "{wire}"')
        imap.ok(b'APPEND "' + wire.encode() + b'" {6+}\r\nx: y\r\n')
        assert b"* 1 EXISTS" in imap.ok(f'SELECT "{wire}"')
    listed = names(imap.ok('LIST "" "*"'))
    assert set(wanted) <= set(listed)
    assert set(wanted) <= set(names(imap.ok('LSUB "" "*"'), b"LSUB"))
    for _root, dirs, files in os.walk(server.dataDir):
        assert not [n for n in dirs + files if "\\" in n]
    imap.ok('RENAME "a\\\\b" "c\\\\d"')
    assert "c\\d" in names(imap.ok('LIST "" "*"'))
    imap.ok('DELETE "c\\\\d"')
    assert "c\\d" not in names(imap.ok('LIST "" "*"'))
