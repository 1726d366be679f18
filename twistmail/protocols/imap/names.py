# -*- test-case-name: tests.test_imap_server -*-
"""Mailbox names on the wire, LIST patterns, and special-use folders.

IMAP4rev1 spells non-ASCII mailbox names in modified UTF-7 (RFC 3501
§5.1.3; Twisted registers the ``imap4-utf-7`` codec); a session that has
sent ``ENABLE UTF8=ACCEPT`` spells them in UTF-8 instead (RFC 6855 §3).  The
store names them in Unicode with ``/`` as the separator, whatever the
client's spelling, so a folder created by a UTF-7 client and one created by a
UTF-8 client under the same name are the same folder.  What may appear in a name at all
is the store's business (L{twistmail.storage.folders}): a bad name comes
back as InvalidFolderName and is answered with NO.
"""

from __future__ import annotations

import re

import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec

from twistmail.storage import folders

SEPARATOR = folders.SEPARATOR


#: RFC 6855 §3: a UTF-8 mailbox name holds no C0 or C1 control, DEL, U+2028 or U+2029.
_NOT_IN_UTF8_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class BadName(Exception):
    """Not valid modified UTF-7 (or, after ENABLE UTF8=ACCEPT, not valid UTF-8)."""


def decode(wire: bytes, utf8: bool = False) -> str:
    """A mailbox name from the wire; INBOX in any case is INBOX.

    @param utf8: the session has enabled UTF8=ACCEPT: the name is UTF-8 and an
        ``&`` in it is an ampersand (RFC 6855 §3), not the start of a UTF-7 shift.
    """
    if utf8:
        try:
            name = wire.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadName(f"mailbox name is not valid UTF-8 (octet {e.start + 1})") from None
        bad = _NOT_IN_UTF8_NAMES.search(name)
        if bad is not None:
            raise BadName(f"mailbox name holds U+{ord(bad.group()):04X}, a control or "
                          "separator character (RFC 6855 section 3)")
    else:
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


def encode(name: str, utf8: bool = False) -> bytes:
    """C{name} as the session spells it: modified UTF-7, or UTF-8 after ENABLE UTF8=ACCEPT."""
    return name.encode("utf-8", "surrogatepass") if utf8 else name.encode("imap4-utf-7")


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
