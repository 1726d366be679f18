# -*- test-case-name: tests.test_imap_sort -*-
"""SORT (RFC 5256 §3): sort criteria, and what each message is sorted (and threaded) by.

What a message is sorted by is read from its header once, in a worker
thread, into a L{Described}; THREAD (L{twistmail.protocols.imap.thread})
uses the same record.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from dataclasses import dataclass, field

from twistmail.protocols.imap import search, structure
from twistmail.protocols.imap.basesubject import baseSubject
from twistmail.protocols.imap.parser import Arguments, ParseError

KEYS = (b"ARRIVAL", b"CC", b"DATE", b"FROM", b"SIZE", b"SUBJECT", b"TO")
#: Only the last references of a message are threaded by: a crafted References
#: field of 100,000 ids would make one long chain to walk for every link.
MAX_REFERENCES = 100
_MSGID = re.compile(r"<\s*([^<>\s@]+@[^<>\s]+)\s*>")


def parseCriteria(args: Arguments) -> list[tuple[bytes, bool]]:
    """``(REVERSE DATE SUBJECT)`` -> [(b"DATE", True), (b"SUBJECT", False)] (RFC 5256 §5)."""
    criteria = []
    reverse = False
    for word in args.parenthesized(args.atom):
        word = word.upper()
        if word == b"REVERSE" and not reverse:
            reverse = True
            continue
        if word not in KEYS:
            raise ParseError(f"unknown sort key {word[:32].decode('ascii', 'replace')}")
        criteria.append((word, reverse))
        reverse = False
    if reverse or not criteria:
        raise ParseError("REVERSE must come before a sort key")
    return criteria


@dataclass
class Described:
    """One message as SORT and THREAD see it."""

    seq: int
    uid: int
    arrival: float
    size: int
    sent: float = 0.0
    subject: str = ""  # the base subject, casefolded
    isReply: bool = False
    fromMailbox: str = ""
    toMailbox: str = ""
    ccMailbox: str = ""
    messageId: str | None = None
    references: list[str] = field(default_factory=list)


def describe(candidate: search.Candidate, data: bytes | None) -> Described:
    """Worker thread: what C{candidate} is sorted and threaded by (C{data} None: its
    text has gone, RFC 2180 §4.1: it sorts as a message with an empty header)."""
    message = candidate.message
    out = Described(candidate.seq, candidate.uid, message.internalDate, message.size,
                    sent=message.internalDate)
    if not data:
        return out
    candidate.data = data
    root = candidate.root
    out.sent = _sentDate(_first(root, "date"), message.internalDate)
    subject, out.isReply = baseSubject(search.decodeHeader(_first(root, "subject") or ""))
    out.subject = subject.casefold()
    out.fromMailbox = _firstMailbox(root, "from")
    out.toMailbox = _firstMailbox(root, "to")
    out.ccMailbox = _firstMailbox(root, "cc")
    ids = _MSGID.findall(_first(root, "message-id") or "")
    out.messageId = ids[0] if ids else None
    # RFC 5256 §4 REFERENCES (1): References, or else In-Reply-To's first valid id.
    references = _MSGID.findall(" ".join(structure.rawValues(root, "references")))
    if not references:
        references = _MSGID.findall(_first(root, "in-reply-to") or "")[:1]
    out.references = references[-MAX_REFERENCES:]
    candidate.data = candidate._root = None
    return out


def _first(root: structure.Entity, name: str) -> str | None:
    values = structure.rawValues(root, name)
    return values[0] if values else None


def _firstMailbox(root: structure.Entity, name: str) -> str:
    """RFC 5256 §3: the addr-mailbox of the first address (empty if there is none)."""
    for _, _, mailbox, host in structure.addressList(root, name) or ():
        if mailbox and host is not None:
            return mailbox.casefold()
    return ""


def _sentDate(value: str | None, internalDate: float) -> float:
    """RFC 5256 §2.2 sent date in UTC; §3 DATE: the internal date when there is none."""
    if value:
        try:
            sent = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return internalDate
        if sent.tzinfo is None:  # "-0000" or none: taken as UTC (§2.2)
            sent = sent.replace(tzinfo=datetime.UTC)
        try:
            return sent.timestamp()
        except (OverflowError, ValueError):
            return internalDate
    return internalDate


_SORT_KEYS = {
    b"ARRIVAL": lambda d: d.arrival, b"CC": lambda d: d.ccMailbox, b"DATE": lambda d: d.sent,
    b"FROM": lambda d: d.fromMailbox, b"SIZE": lambda d: d.size,
    b"SUBJECT": lambda d: d.subject, b"TO": lambda d: d.toMailbox,
}


def sortMessages(described: list[Described], criteria: list[tuple[bytes, bool]]) -> list[Described]:
    """In C{criteria} order; equal ones in mailbox order (RFC 5256 §3), whatever REVERSE says."""
    ordered = sorted(described, key=lambda d: d.seq)
    for name, reverse in reversed(criteria):
        ordered.sort(key=_SORT_KEYS[name], reverse=reverse)  # stable: earlier passes break ties
    return ordered
