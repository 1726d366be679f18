# -*- test-case-name: tests.test_imap_server -*-
"""One IMAP session's view of its selected folder.

Sequence numbers are per session (RFC 3501 §2.3.1.2): another session's
EXPUNGE renumbers this one only when this one is told, and it may be told
only at certain moments (never in the middle of FETCH, STORE or SEARCH,
§7.4.1).  So the view keeps its own uid list and the folder's change
notifications pile up until L{SelectedFolder.updates} turns them into
untagged EXPUNGE, EXISTS, RECENT and FETCH FLAGS responses.

A keyword the session has not been told of is announced with FLAGS and
PERMANENTFLAGS before any FETCH shows it (RFC 3501 §7.2.6: clients keep
their keyword list from FLAGS), whichever session added it.

Until then a message another session expunged is still this session's
(RFC 2180 §4.1.2, as Dovecot does): L{SelectedFolder.message} serves it as
it was when it went (kept only for messages in this view, until reported).

Memory matters with a thousand sessions idling on one folder: when nothing
is pending, a view's uid list *is* the folder's shared uid tuple, and flags
are never copied per session.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence

from twistmail import _gcpause
from twistmail.protocols.imap import condstore, response

#: The system flags in the order FLAGS lists them, and the one keyword always offered.
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_OFFERED = ("$Forwarded",)


class SelectedFolder:
    def __init__(self, mailbox, readOnly: bool,
                 claimRecent: Callable[[object, Sequence[int]], set]) -> None:
        self.mailbox = mailbox
        self.readOnly = readOnly
        self.uids = mailbox.uids()
        self._claimRecent = claimRecent
        self.recent: set[int] = claimRecent(mailbox, self.uids)
        self._removed: set[int] = set()
        self._expunged: dict[int, object] = {}  # uid -> StoredMessage, removed but not told
        self._flagsChanged: set[int] = set()
        self._told: dict[int, frozenset] = {}  # flags this session just reported itself
        self._toldColumns: list[tuple] = []  # the same as (uids, flag sets); older than _told
        self._announced: frozenset = frozenset()  # keywords this session was told of
        self.validityChanged = False
        self.onChange: Callable[[], None] | None = None  # set while in IDLE
        # RFC 7162: once CONDSTORE is on, flag updates carry MODSEQ; once QRESYNC is,
        # expunges are told as VANISHED (UIDs) instead of EXPUNGE (sequence numbers).
        self.condstore = False
        self.qresync = False
        mailbox.addListener(self._changed)

    def close(self) -> None:
        self.mailbox.removeListener(self._changed)
        self.onChange = None
        self._expunged.clear()

    def _changed(self, changes) -> None:
        self._removed.update(changes.removed)
        for message in changes.expunged:
            if self.seq(message.uid) is not None:  # bounded by this view's size
                self._expunged[message.uid] = message
        self._flagsChanged.update(changes.flagsChanged)
        if changes.uidValidityChanged:
            self.validityChanged = True
        if self.onChange is not None:
            self.onChange()

    # -- numbering ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.uids)

    def seq(self, uid: int) -> int | None:
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def seqSpans(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Index spans (start, stop) of L{uids} for sequence-number ranges (already
        resolved against ``*``): the messages numbered start + 1 to stop."""
        return [(max(low, 1) - 1, min(high, len(self.uids))) for low, high in ranges]

    def uidSpans(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """L{seqSpans} for UID ranges; UIDs that are not in the folder are skipped."""
        return [(bisect_left(self.uids, low), bisect_right(self.uids, high)) for low, high in ranges]

    def pairs(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(seq, uid) of each message in C{spans}."""
        out: list[tuple[int, int]] = []
        with _gcpause.paused(sum(stop - start for start, stop in spans)):  # 1:* of 100,000
            for start, stop in spans:
                out.extend(zip(range(start + 1, stop + 1), self.uids[start:stop], strict=True))
        return out

    def byUid(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(seq, uid) for UID ranges; UIDs that are not in the folder are skipped."""
        return self.pairs(self.uidSpans(ranges))

    def message(self, uid: int):
        """The message with this uid as this session sees it: the folder's, or, if another
        session expunged it and this one has not been told, as it was (None if unknown)."""
        message = self.mailbox.message(uid)
        return self._expunged.get(uid) if message is None else message

    def largestUid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def told(self, uid: int, flags: frozenset) -> None:
        """This session reported C{flags} for C{uid} itself (STORE, FETCH): no repeat needed."""
        self._told[uid] = flags

    def toldMany(self, uids, flagSets) -> None:
        """L{told} for many messages at once (a FETCH of the whole folder's flags; C{uids}
        ascending): kept as the two columns, not as 100,000 entries of L{_told}."""
        if self._told:  # _told must stay newer than every column
            self._told.update(zip(uids, flagSets, strict=True))
        else:
            self._toldColumns.append((uids, flagSets))

    def _toldFlags(self, uid: int) -> frozenset | None:
        """The flags this session last reported for C{uid} since the last L{updates}."""
        flags = self._told.get(uid)
        if flags is None:
            for uids, flagSets in reversed(self._toldColumns):
                i = bisect_left(uids, uid)
                if i < len(uids) and uids[i] == uid:
                    return flagSets[i]
        return flags

    def pending(self) -> bool:
        current = self.mailbox.uids()
        return bool(self._removed or self._flagsChanged or
                    (current and current[-1] > self.largestUid()))

    # -- untagged updates -----------------------------------------------------------

    def flagsResponses(self) -> list[bytes]:
        """FLAGS and PERMANENTFLAGS (RFC 3501 §7.2.6, §7.1) for the folder's keywords now."""
        keywords = list(self.mailbox.keywords())
        self._announced = frozenset(keywords)
        flags = list(SYSTEM_FLAGS) + list(_OFFERED) + [k for k in keywords if k not in _OFFERED]
        out = [b"* FLAGS " + response.flagList(flags)]
        if self.readOnly:
            out.append(b"* OK [PERMANENTFLAGS ()] Read-only mailbox")
            return out
        limit = self.mailbox.maxKeywords
        permanent = flags + (["\\*"] if limit is None or len(keywords) < limit else [])
        out.append(b"* OK [PERMANENTFLAGS " + response.flagList(permanent) + b"] Flags allowed")
        return out

    def newKeywords(self) -> list[bytes]:
        """FLAGS and PERMANENTFLAGS again if the folder has keywords this session was not
        told of: to be sent before any FETCH that could show them."""
        if self._announced.issuperset(self.mailbox.keywords()):
            return []
        return self.flagsResponses()

    def updates(self, expunge: bool = True) -> list[bytes]:
        """Untagged responses for what changed since the last call, applied to the view.

        @param expunge: False while answering FETCH, STORE or SEARCH: removals
            wait, and the removed messages keep their sequence numbers.
        """
        out: list[bytes] = self.newKeywords()
        if expunge and self._removed:
            gone = {uid for uid in self._removed if self.seq(uid) is not None}
            if self.qresync:
                out += condstore.vanishedLines(response.runs(sorted(gone)), earlier=False)
            else:
                # Highest first: each number is still valid when the client reads it.
                for uid in sorted(gone, reverse=True):
                    out.append(b"* %d EXPUNGE" % self.seq(uid))
            if gone:
                self.uids = [u for u in self.uids if u not in gone]
                self.recent -= gone
            self._removed.clear()
            self._expunged.clear()
        current = self.mailbox.uids()
        newer = current[bisect_right(current, self.largestUid()):]
        if newer:
            self.uids = list(self.uids) + list(newer)
            self.recent |= self._claimRecent(self.mailbox, newer)
            out.append(b"* %d EXISTS" % len(self.uids))
            out.append(b"* %d RECENT" % len(self.recent))
        for uid in sorted(self._flagsChanged):
            seq = self.seq(uid)
            message = self.mailbox.message(uid)
            if seq is None or message is None or self._toldFlags(uid) == message.flags:
                continue
            out.append(b"* %d FETCH (UID %d FLAGS %s%s)" % (seq, uid, self.flagList(message),
                                                            self.modseqItem(message)))
        self._flagsChanged.clear()
        self._told.clear()
        self._toldColumns.clear()
        if not self._removed and len(self.uids) == len(current):
            self.uids = current  # share the folder's tuple again
        return out

    def modseqItem(self, message) -> bytes:
        """`` MODSEQ (n)`` for a FETCH response once CONDSTORE is on (RFC 7162 §3.1.4), else b""."""
        return b" MODSEQ (%d)" % message.modseq if self.condstore else b""

    def flagList(self, message) -> bytes:
        flags = message.flags | {"\\Recent"} if message.uid in self.recent else message.flags
        return response.flagList(flags)
