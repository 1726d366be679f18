"""Deterministic benchmark messages of an exact size.

Every message is a realistic RFC 5322 text message (headers, blank line,
body text lines of about 76 characters, CRLF line endings).  Messages differ
only in a fixed-width sequence number in Subject and Message-ID, so the size
is identical for all of them and any retrieved message can be regenerated
from its Message-ID for verification without keeping 2,000 copies around.
"""

from __future__ import annotations

import re

SENDER = "bench@client.test"
RECIPIENT = "alice@example.test"

_WORDS = (
    "the quick brown fox jumps over lazy dogs while mail servers queue "
    "messages durably and deliver them to maildir folders for later "
    "retrieval by post office protocol clients across the loopback network "
    "interface under a moderate concurrent load generated in python"
).split()

_HEAD = (
    "From: Bench Sender <" + SENDER + ">\r\n"
    "To: Alice <" + RECIPIENT + ">\r\n"
    "Subject: twistmail benchmark message %08d\r\n"
    "Date: Mon, 23 Nov 2026 19:30:00 +0000\r\n"
    "Message-ID: <bench-%08d@client.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
).encode("ascii")

_MSGID = re.compile(rb"Message-ID: <bench-(\d{8})@client\.test>", re.IGNORECASE)


def _body(length: int) -> bytes:
    """Return exactly ``length`` bytes of CRLF-terminated text lines (<=78)."""
    lines: list[str] = []
    used = 0
    i = 0
    while used < length:
        line = ""
        while len(line) < 70:
            line += _WORDS[i % len(_WORDS)] + " "
            i += 1
        line = line.rstrip()[:76]
        room = length - used - 2
        if room < len(line) + 4:
            # Last line: pad or trim to land exactly on ``length``.
            line = (line * 2)[:room] if room > 0 else ""
        lines.append(line)
        used += len(line) + 2
    data = "".join(line + "\r\n" for line in lines).encode("ascii")
    if len(data) != length:
        raise ValueError(f"cannot build a {length}-byte body")
    return data


class MessageFactory:
    """Build messages of ``size`` bytes (CRLF form, without the final dot)."""

    def __init__(self, size: int = 4096, prefix: bytes = b"") -> None:
        """@param prefix: header lines put first in every message (a DKIM-Signature
            valid for all of them: it signs neither Subject nor Message-ID), on top
            of C{size}."""
        head_len = len(_HEAD % (0, 0))
        if size < head_len + 2:
            raise ValueError(f"size must be at least {head_len + 2} bytes")
        self.prefix = prefix
        self.size = size + len(prefix)
        self.body = _body(size - head_len)

    def head(self, seq: int) -> bytes:
        """Headers for message ``seq`` (the body is shared by all messages)."""
        return self.prefix + _HEAD % (seq, seq)

    def render(self, seq: int) -> bytes:
        """The full message ``seq`` exactly as sent on the wire (unstuffed)."""
        return self.head(seq) + self.body


def sequence_of(message: bytes) -> int | None:
    """Extract the sequence number from a retrieved message, if present."""
    match = _MSGID.search(message)
    return int(match.group(1)) if match else None
