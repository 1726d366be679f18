# -*- test-case-name: tests.test_imap_esearch -*-
"""ESEARCH (RFC 4731) and SEARCHRES (RFC 5182): SEARCH RETURN (...) and its answers.

``SEARCH RETURN (MIN MAX COUNT ALL SAVE) keys`` answers with one ``ESEARCH``
response instead of a list of every number, and SAVE keeps the result (as
UIDs, so it follows expunges) for ``$`` in the session's later commands.
"""

from __future__ import annotations

from twistmail.protocols.imap import response
from twistmail.protocols.imap.parser import Arguments, ParseError

#: RFC 4731 §3.1 and RFC 5182 §2.1 result options.
OPTIONS = (b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE")


def parseReturn(args: Arguments) -> frozenset | None:
    """``RETURN (options) SP`` before the search keys, or None if there is none."""
    if args.peek(7).upper() != b"RETURN ":
        return None
    args.expect(b"RETURN ")
    options = [o.upper() for o in args.parenthesized(args.atom)]
    args.sp()
    for option in options:
        if option not in OPTIONS:
            raise ParseError(f"unknown search return option {option[:32].decode('ascii', 'replace')}")
    # RFC 4731 §3.1: RETURN () means RETURN (ALL).
    return frozenset(options) or frozenset({b"ALL"})


def answer(tag: bytes, options: frozenset, numbers: list[int], uid: bool) -> bytes | None:
    """The ``* ESEARCH`` line for the found C{numbers} (ascending), or None when
    SAVE is the only option (RFC 5182 §2.1: no ESEARCH response then)."""
    if options == {b"SAVE"}:
        return None
    out = b"* ESEARCH (TAG " + response.string(tag) + b")"
    if uid:
        out += b" UID"
    # RFC 4731 §3.1: MIN, MAX and ALL are left out when nothing matched; COUNT is 0.
    if numbers and b"MIN" in options:
        out += b" MIN %d" % numbers[0]
    if numbers and b"MAX" in options:
        out += b" MAX %d" % numbers[-1]
    if numbers and b"ALL" in options:
        out += b" ALL " + response.sequenceSet(numbers)
    if b"COUNT" in options:
        out += b" COUNT %d" % len(numbers)
    return out


def saved(options: frozenset, uids: list[int]) -> list[tuple[int, int]]:
    """The UID ranges that SAVE keeps for ``$`` (RFC 5182 §2.1): only the minimum
    and/or maximum when MIN and/or MAX come without ALL or COUNT, else all of them."""
    if uids and not options & {b"ALL", b"COUNT"} and options & {b"MIN", b"MAX"}:
        uids = sorted({uids[0] if b"MIN" in options else uids[-1],
                       uids[-1] if b"MAX" in options else uids[0]})
    return response.runs(uids)
