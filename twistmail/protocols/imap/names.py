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


def pattern(reference: str, mailbox: str) -> re.Pattern:
    """RFC 3501 §6.3.8: reference + mailbox, with * (anything) and % (anything but /)."""
    if mailbox.startswith(SEPARATOR) or not reference:
        combined = mailbox
    elif reference.endswith(SEPARATOR):
        combined = reference + mailbox
    else:
        combined = reference + SEPARATOR + mailbox
    parts = []
    for piece in re.split(r"([*%])", combined):
        if piece == "*":
            parts.append(".*")
        elif piece == "%":
            parts.append("[^" + re.escape(SEPARATOR) + "]*")
        else:
            parts.append(re.escape(piece))
    regex = "".join(parts)
    if combined[:5].upper() == "INBOX":
        regex = "(?i:INBOX)" + "".join(parts)[len(re.escape(combined[:5])):]
    return re.compile(regex + r"\Z", re.DOTALL)

