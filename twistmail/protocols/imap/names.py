# -*- test-case-name: tests.test_imap_server -*-
"""Mailbox names on the wire, LIST patterns, and special-use folders.

IMAP4rev1 spells non-ASCII mailbox names in modified UTF-7 (RFC 3501
§5.1.3; Twisted registers the ``imap4-utf-7`` codec); the store names them
in Unicode with ``/`` as the separator.  What may appear in a name at all
is the store's business (L{twistmail.storage.folders}): a bad name comes
back as InvalidFolderName and is answered with NO.
"""

from __future__ import annotations

import re

import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec

from twistmail.storage import folders

SEPARATOR = folders.SEPARATOR


class BadName(Exception):
    """Not valid modified UTF-7."""


def decode(wire: bytes) -> str:
    """A mailbox name from the wire; INBOX in any case is INBOX."""
    try:
        name = wire.decode("imap4-utf-7")
    except (UnicodeError, ValueError) as e:
        raise BadName(f"mailbox name is not valid modified UTF-7: {e}") from None
    if name.encode("imap4-utf-7") != wire:
        # Twisted's decoder is lenient (a stray '&', non-canonical shifts): only the
        # one spelling of a name is accepted, so one folder cannot have two names.
        raise BadName("mailbox name is not valid modified UTF-7")
    if name.upper() == "INBOX" or name.upper().startswith("INBOX" + SEPARATOR):
        name = "INBOX" + name[5:]
    return name


def encode(name: str) -> bytes:
    return name.encode("imap4-utf-7")


def pattern(reference: str, mailbox: str) -> Pattern:
    """RFC 3501 §6.3.8: reference + mailbox, with * (anything) and % (anything but /).

    Joined by plain concatenation, as Dovecot, Cyrus and Gmail do: ``LIST "foo" "*"``
    is ``foo*``, which matches ``foo`` itself, ``foobar`` and everything below ``foo``.
    """
    return Pattern(reference + mailbox)


class Pattern:
    """A LIST pattern, matched in time linear in its length times the name's.

    It used to be translated to a regex (``*`` -> ``.*``): a pattern such as
    ``*a*a*a*a*a*b`` backtracks exponentially on a folder named ``aaaa...``,
    and one LIST froze the reactor for minutes (5 wildcards, 200 octets: 27 s).
    Here the set of positions the pattern can have reached is a bit set, and
    each wildcard or literal run is a few big-integer operations.
    """

    def __init__(self, text: str) -> None:
        # INBOX is case-insensitive (RFC 3501 §5.1), and only INBOX.
        self.inbox = text[:5].upper() == "INBOX"
        if self.inbox:
            text = text[5:]
        self.tokens: list[str] = []
        for piece in re.split(r"([*%]+)", text):
            if not piece:
                continue
            if piece[0] in "*%":
                piece = "*" if "*" in piece else "%"  # ** is *, %% is %, *% is *
            self.tokens.append(piece)
        self.literal = sum(len(t) for t in self.tokens if t not in ("*", "%"))
        self.percent = "%" in self.tokens

    def match(self, name: str) -> bool:
        if self.inbox:
            if name[:5].upper() != "INBOX":
                return False
            name = name[5:]
        n = len(name)
        if self.literal > n:
            return False
        occurrences: dict[str, int] = {}
        everywhere = (1 << (n + 1)) - 1
        if self.percent:
            # positions p (1..n) whose step from p-1 does not cross a separator
            enterable = everywhere & ~1
            i = name.find(SEPARATOR)
            while i >= 0:
                enterable &= ~(1 << (i + 1))
                i = name.find(SEPARATOR, i + 1)
        reached = 1  # position 0
        for token in self.tokens:
            if token == "*":
                reached = everywhere & ~((reached & -reached) - 1)
            elif token == "%":
                reached = _fill(reached, enterable)
            else:
                starts = occurrences.get(token)
                if starts is None:
                    starts = 0
                    i = name.find(token)
                    while i >= 0:
                        starts |= 1 << i
                        i = name.find(token, i + 1)
                    occurrences[token] = starts
                reached = (reached & starts) << len(token)
            if not reached:
                return False
        return bool(reached >> n & 1)


def _fill(seeds: int, enterable: int) -> int:
    """C{seeds} and every position reached from one by steps onto C{enterable} positions
    (Kogge-Stone: doubling shifts, so log2 of the name's length rounds)."""
    step = 1
    while enterable:
        seeds |= enterable & (seeds << step)
        enterable &= enterable << step
        step *= 2
    return seeds
