# -*- test-case-name: tests.test_smtputf8_relay -*-
"""Relaying a message that arrived with SMTPUTF8 (RFC 6531 §3.2), decided as
Postfix (``smtputf8_enable = yes``) decides it.

To a next hop that offers SMTPUTF8 the message goes with the parameter, its
addresses as queued.  To one that does not, it goes without the parameter
("downgraded") only when nothing in it needs SMTPUTF8: every envelope address
has an ASCII local part (an internationalised domain is sent as its A-label,
which is the same domain) and the header section is ASCII (an 8-bit body is
8BITMIME's business, not SMTPUTF8's).  Otherwise it is returned to the sender
with 5.6.7 (RFC 6531 §3.2, RFC 5248): converting UTF-8 headers (RFC 6857
downgrading) would change what the sender wrote and break its signatures, and
an address with a UTF-8 local part has no ASCII form at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from twistmail.eai import asciiAddress

#: Of a header section at most this much is read (as the queue's readHeaders).
MAX_HEADER = 64 * 1024


def asciiEnvelope(sender: str, recipients: Sequence[str]) -> tuple[str, list[str]] | None:
    """The envelope with every domain an A-label, or None when an address needs SMTPUTF8."""
    converted = [asciiAddress(a) for a in (sender, *recipients)]
    if None in converted:
        return None
    return converted[0], converted[1:]


def headersASCII(message: BinaryIO) -> bool:
    """Whether the header section of C{message} is ASCII (read from the start, in a
    worker thread; the file is left at its start)."""
    message.seek(0)
    try:
        read = 0
        while read < MAX_HEADER:
            line = message.readline(MAX_HEADER)
            if not line or line in (b"\r\n", b"\n"):
                break
            if not line.isascii():
                return False
            read += len(line)
        return True
    finally:
        message.seek(0)


def refusal(hostname: str, why: str) -> str:
    """The reply recorded for every recipient (and quoted in the DSN)."""
    return f"550 5.6.7 SMTPUTF8 is required, but was not offered by host {hostname}: {why}"
