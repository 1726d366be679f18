# -*- test-case-name: tests.test_imap_condstore -*-
"""CONDSTORE and QRESYNC (RFC 7162): their command parameters and the resync answers.

The server asks the folder (L{twistmail.interfaces.IModSeqMailbox}) what
changed since a mod-sequence: C{changedSince} walks back over the changes
only, and C{vanishedSince} reads a bounded list of expunged UIDs, so a resync
of a 100,000-message folder after a few changes costs a few lookups, not a
pass over the folder.  When the folder has forgotten expunges that old, the
UIDs the client says it knows are compared with what is there instead
(RFC 7162 §3.2.5.2).  A folder without mod-sequences is SELECTed with
``OK [NOMODSEQ]``, and the commands that need them are refused with BAD
(§3.1.2.2).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from twistmail.interfaces import IModSeqMailbox
from twistmail.protocols.imap import response
from twistmail.protocols.imap.parser import Arguments, ParseError

#: UIDs in one VANISHED response line; more go on further lines.
VANISHED_RANGES = 1000


@dataclass(frozen=True)
class QResync:
    """SELECT's QRESYNC parameter (RFC 7162 §3.2.5)."""

    uidValidity: int
    modseq: int
    knownUids: list | None  # resolved (low, high) ranges, or None: every UID below UIDNEXT


@dataclass(frozen=True)
class SelectParams:
    condstore: bool = False
    qresync: QResync | None = None


def hasModSeqs(mailbox) -> bool:
    return IModSeqMailbox.providedBy(mailbox)


def parseSelectParams(args: Arguments) -> SelectParams:
    """``SP ( CONDSTORE / QRESYNC (...) )`` after SELECT's mailbox name, if there."""
    if args.atEnd():
        return SelectParams()
    args.sp()
    condstore, qresync = False, None
    for name, value in args.parenthesized(lambda: _param(args)):
        if name == b"CONDSTORE":
            condstore = True
        else:
            qresync = value
    return SelectParams(condstore, qresync)


def _param(args: Arguments) -> tuple[bytes, QResync | None]:
    name = args.atom().upper()
    if name == b"CONDSTORE":
        return name, None
    if name != b"QRESYNC":
        raise ParseError(f"unknown SELECT parameter {name[:32].decode('ascii', 'replace')}")
    args.sp()
    args.expect(b"(")
    uidValidity = args.number(nonZero=True)
    args.sp()
    modseq = args.modseq()
    known = None
    if args.accept(b" "):
        if args.peek() != b"(":
            known = args.sequenceSet()
            if known.usesStar():
                raise ParseError("known-uids cannot use *")
            known = known.resolve(0)
            args.accept(b" ")
        if args.peek() == b"(":
            # seq-match-data: used by servers that cannot tell expunges apart; the
            # tombstones or known-uids answer without it, so it is only checked.
            args.expect(b"(")
            args.sequenceSet()
            args.sp()
            args.sequenceSet()
            args.expect(b")")
    args.expect(b")")
    return name, QResync(uidValidity, modseq, known)


def parseFetchModifiers(args: Arguments) -> tuple[int | None, bool]:
    """``SP ( CHANGEDSINCE n [SP VANISHED] )`` after FETCH's items: (changedSince, vanished)."""
    if args.atEnd():
        return None, False
    args.sp()
    changedSince, vanished = None, False

    def modifier() -> None:
        nonlocal changedSince, vanished
        name = args.atom().upper()
        if name == b"CHANGEDSINCE":
            args.sp()
            changedSince = args.modseq()
        elif name == b"VANISHED":
            vanished = True
        else:
            raise ParseError(f"unknown FETCH modifier {name[:32].decode('ascii', 'replace')}")

    if not args.parenthesized(modifier):
        raise ParseError("empty FETCH modifier list")
    if vanished and changedSince is None:
        raise ParseError("VANISHED needs CHANGEDSINCE")  # RFC 7162 §3.2.6
    return changedSince, vanished


def parseStoreModifier(args: Arguments) -> int | None:
    """``( UNCHANGEDSINCE n ) SP`` between STORE's set and its item, if there."""
    if args.peek() != b"(":
        return None
    args.expect(b"(")
    name = args.atom().upper()
    if name != b"UNCHANGEDSINCE":
        raise ParseError(f"unknown STORE modifier {name[:32].decode('ascii', 'replace')}")
    args.sp()
    value = args.modseq(zero=True)
    args.expect(b")")
    args.sp()
    return value


def missing(ranges: list, present) -> list[tuple[int, int]]:
    """The parts of C{ranges} (sorted, merged (low, high)) holding no uid of C{present}
    (ascending): O(ranges + present uids inside them), whatever the ranges span."""
    out = []
    for low, high in ranges:
        i, stop = bisect_left(present, low), bisect_right(present, high)
        start = low
        for uid in present[i:stop]:
            if uid > start:
                out.append((start, uid - 1))
            start = uid + 1
        if start <= high:
            out.append((start, high))
    return out


def within(uids, ranges: list) -> list[int]:
    """The C{uids} inside C{ranges} (sorted, merged (low, high))."""
    lows = [low for low, _ in ranges]
    out = []
    for uid in uids:
        i = bisect_right(lows, uid) - 1
        if i >= 0 and uid <= ranges[i][1]:
            out.append(uid)
    return out


def vanished(mailbox, viewUids, since: int, ranges: list) -> list[tuple[int, int]]:
    """UIDs in C{ranges} expunged after modseq C{since}, as ranges, leaving out those this
    session still shows (it hears of them at the next point it may: RFC 7162 §3.2.10).

    Where the folder no longer remembers expunges that old, every UID in C{ranges}
    that is not there now (RFC 7162 §3.2.5.2 allows the server that answer)."""
    shown = set(viewUids)
    gone = mailbox.vanishedSince(since)
    if gone is not None:
        return response.runs(sorted(u for u in within(gone, ranges) if u not in shown))
    present = sorted(set(mailbox.uids()) | shown)
    return missing(ranges, present)


def vanishedLines(ranges: list[tuple[int, int]], earlier: bool) -> list[bytes]:
    """``* VANISHED [(EARLIER)] <uid set>`` lines (RFC 7162 §3.2.10), none if no ranges."""
    head = b"* VANISHED (EARLIER) " if earlier else b"* VANISHED "
    return [head + response.rangeSet(ranges[i:i + VANISHED_RANGES])
            for i in range(0, len(ranges), VANISHED_RANGES)]


def changed(mailbox, since: int, view, targets: list | None = None,
            uidRanges: list | None = None) -> list:
    """(seq, uid) of the session's messages changed after C{since}, in sequence order:
    among C{targets} ((seq, uid) pairs) or in C{uidRanges} if given.  Costs the number
    of changes, not the folder's size, unless C{targets} were already listed."""
    uids = mailbox.changedSince(since)
    if targets is not None:
        wanted = set(uids)
        return [(s, u) for s, u in targets if u in wanted]
    if uidRanges is not None:
        uids = within(uids, uidRanges)
    out = []
    for uid in uids:
        seq = view.seq(uid)
        if seq is not None:
            out.append((seq, uid))
    return sorted(out)
