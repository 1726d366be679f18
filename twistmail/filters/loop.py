# -*- test-case-name: tests.test_smtp -*-
"""Built-in mail-loop detection, always first on every SMTP listener."""

from __future__ import annotations

from twistmail.filters.base import Filter
from twistmail.model import Verdict

#: RFC 5321 §6.3: more Received: fields than this means a mail loop.
MAX_HOPS = 100


class HopLimit(Filter):
    """Refuses a message that has been relayed more than L{MAX_HOPS} times.

    Counts the Received: fields of the header section only (never the body),
    less our own, which the message filters see is always one."""

    name = "builtin:hops"

    def endOfData(self, session, message):
        # Field names only: their values are not parsed (a thousand of them cost nothing).
        hops = sum(1 for name in message.headers.keys() if name.lower() == "received")
        if hops - 1 > MAX_HOPS:
            return Verdict.reject("5.4.6 Too many hops: mail loop detected", 554)
        return None
