# -*- test-case-name: tests.test_modseq -*-
"""MODSEQs (RFC 7162) of one folder of a file backend, and the journal that keeps them.

Every change to a folder (a message added, its flags changed, it expunged)
gets the next mod-sequence.  Both backends keep them the same way, in a
journal file beside their own index (``twistmail-modseq`` in a Maildir,
``.<folder>.modseq`` beside an mbox)::

    twistmail-modseq 1 V<uidvalidity> U<largest uid known> F<floor>
    <modseq> <uid>        the message got this modseq (added, or flags changed)
    <modseq> -<uid>       the message was expunged at this modseq (a tombstone)

Monotonic across processes: a record is made under an exclusive ``flock`` of
the journal, after reading what other processes appended since (their
numbers are adopted, not repeated).  The journal is rewritten (atomically,
under the lock) when it has grown to twice what it describes.

Bounded: at most L{MAX_TOMBSTONES} expunges are remembered; the modseq of
the last one forgotten is the I{floor}.  Below it L{ModSeqs.vanishedSince}
answers None and QRESYNC falls back to the client's known UIDs (RFC 7162
§3.2.5.2 allows that).  Messages the journal never saw (a folder from before
it) have modseq 1.
"""

from __future__ import annotations

import collections
import fcntl
import os
from typing import NamedTuple

from twistmail import _fsutil

MAGIC = "twistmail-modseq 1"
#: Expunged UIDs remembered for QRESYNC; older ones raise the floor.
MAX_TOMBSTONES = 10000
#: The journal is compacted when it has more lines than this and twice what it describes.
COMPACT_AFTER = 1000


class Delta(NamedTuple):
    """What one worker trip read and wrote, for L{ModSeqs.apply} on the reactor thread."""

    reset: bool  # the journal was new or rewritten: C{records} is the whole of it
    uidValidity: int
    maxUid: int
    floor: int
    records: list  # (modseq, uid), uid negative for an expunge, ascending modseq
    offset: int
    inode: int
    lines: int


class ModSeqs:
    """The in-memory side; changed only by L{apply} (reactor thread, folder lock held).

    C{byUid} is kept in modseq order (an update moves the uid to the end), so
    L{changedSince} walks back only over what changed, however big the folder.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.uidValidity = 0
        self.maxUid = 0
        self.highest = 1
        self.floor = 0
        self.byUid: dict[int, int] = {}
        self.tombstones: collections.deque = collections.deque()
        self.offset = 0
        self.inode = 0
        self.lines = 0

    # -- reading (reactor thread) -------------------------------------------------------

    def of(self, uid: int) -> int:
        return self.byUid.get(uid, 1)

    def changedSince(self, modseq: int) -> list[int]:
        """UIDs whose modseq is above C{modseq}, newest first; O(changes), not O(folder)."""
        out = []
        for uid, value in reversed(self.byUid.items()):
            if value <= modseq:
                break
            out.append(uid)
        return out

    def vanishedSince(self, modseq: int) -> list[int] | None:
        """UIDs expunged after C{modseq}, ascending; None if some may have been forgotten."""
        if modseq < self.floor:
            return None
        out = []
        for value, uid in reversed(self.tombstones):
            if value <= modseq:
                break
            out.append(uid)
        return sorted(out)

    # -- worker thread ---------------------------------------------------------------------

    def record(self, uidValidity: int, added, changed, removed, uidNext: int,
               own=()) -> Delta:
        """Give the changes modseqs and append them to the journal (worker thread, folder
        lock held: reads this object's counters, changes nothing in it).

        Changes another process already recorded (this process saw them in a refresh)
        keep that process's modseq: a message added with a UID the journal knows, an
        expunge it has, a flag change it recorded since our last read, unless the
        flag change is in C{own} (this process's own STORE: always a new modseq).
        """
        fd, st = _lock(self.path)
        try:
            reset = (not self.inode or st.st_ino != self.inode or st.st_size < self.offset
                     or uidValidity != self.uidValidity)
            if reset:
                text = _readFrom(fd, 0)
                header, records, lines = _parse(text)
                if header is None or header[0] != uidValidity:
                    # A new journal (or a new UIDVALIDITY): what is there now has modseq 1.
                    head = _headerLine(uidValidity, uidNext - 1, 0)
                    _fsutil.atomicWrite(self.path, head.encode())
                    return Delta(True, uidValidity, uidNext - 1, 0, [], len(head),
                                 os.stat(self.path).st_ino, 1)
                _, maxUid, floor = header
                highest = 1
            else:
                text = _readFrom(fd, self.offset)
                _, records, lines = _parse(text, header=False)
                lines += self.lines
                maxUid, floor, highest = self.maxUid, self.floor, self.highest
            offset = st.st_size
            # What other processes recorded since we last read (after a compaction by
            # one of them, the whole journal is reread: only modseqs above ours are new).
            seen = self.highest if self.inode else 0
            theirs = {u for m, u in records if m > seen}
            listed = {abs(u) for _, u in records}
            highest = max([highest, self.highest if self.inode else 1] + [m for m, _ in records])
            maxUid = max([maxUid] + list(listed))
            new = [u for u in sorted(added) if u > maxUid and u not in listed]
            new += [u for u in sorted(changed) if u in own or u not in theirs]
            new += [-u for u in sorted(removed) if -u not in theirs]
            mine = [(highest + i, uid) for i, uid in enumerate(new, 1)]
            # After a torn line (a crash mid-append), start on a line of our own.
            torn = "\n" if text and not text.endswith("\n") else ""
            if mine or torn:
                data = (torn + "".join(f"{m} {u}\n" for m, u in mine)).encode()
                os.write(fd, data)
                offset += len(data)
                lines += len(mine)
            return Delta(reset, uidValidity, max(maxUid, uidNext - 1), floor, records + mine,
                         offset, st.st_ino, lines)
        finally:
            os.close(fd)  # releases the lock

    def compact(self, snapshot: list, tombstones: list) -> Delta | None:
        """Rewrite the journal from C{snapshot} ((modseq, uid) in modseq order) if no other
        process appended since our last read (worker thread).  None if skipped."""
        fd, st = _lock(self.path)
        try:
            if st.st_ino != self.inode or st.st_size != self.offset:
                return None
            floor = self.floor
            if len(tombstones) > MAX_TOMBSTONES:
                floor = max(floor, tombstones[-MAX_TOMBSTONES - 1][0])
                tombstones = tombstones[-MAX_TOMBSTONES:]
            records = sorted(snapshot + [(m, -u) for m, u in tombstones])
            text = _headerLine(self.uidValidity, self.maxUid, floor) + "".join(
                f"{m} {u}\n" for m, u in records)
            _fsutil.atomicWrite(self.path, text.encode())
            return Delta(True, self.uidValidity, self.maxUid, floor, records, len(text),
                         os.stat(self.path).st_ino, len(records) + 1)
        finally:
            os.close(fd)

    def needsCompaction(self) -> bool:
        return self.lines > max(COMPACT_AFTER, 2 * (len(self.byUid) + len(self.tombstones)))

    # -- reactor thread ------------------------------------------------------------------------

    def apply(self, delta: Delta) -> None:
        if delta.reset:
            self.byUid = {}
            self.tombstones = collections.deque()
            self.highest = 1
        self.uidValidity, self.maxUid, self.floor = delta.uidValidity, delta.maxUid, delta.floor
        byUid, tombstones = self.byUid, self.tombstones
        for modseq, uid in delta.records:
            if uid < 0:
                byUid.pop(-uid, None)
                tombstones.append((modseq, -uid))
            else:
                byUid.pop(uid, None)  # to the end: byUid stays in modseq order
                byUid[uid] = modseq
            if modseq > self.highest:
                self.highest = modseq
        while len(tombstones) > MAX_TOMBSTONES:
            self.floor = max(self.floor, tombstones.popleft()[0])
        self.offset, self.inode, self.lines = delta.offset, delta.inode, delta.lines


def _lock(path: str) -> tuple[int, os.stat_result]:
    """Open and exclusively lock the journal at C{path}: the file there now, not one another
    process replaced (compacted) while we waited for the lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        try:
            if os.stat(path).st_ino == st.st_ino:
                return fd, st
        except FileNotFoundError:
            pass
        os.close(fd)


def _headerLine(uidValidity: int, maxUid: int, floor: int) -> str:
    return f"{MAGIC} V{uidValidity} U{maxUid} F{floor}\n"


def _readFrom(fd: int, offset: int) -> str:
    chunks = []
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("ascii", "replace")


def _parse(text: str, header: bool = True) -> tuple[tuple | None, list, int]:
    """(header (uidvalidity, maxUid, floor) or None, records, lines) of journal text;
    a torn last line (a crash mid-append) is left out."""
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    else:
        lines.pop()
    head = None
    if header:
        if not lines:
            return None, [], 0
        fields = lines[0].split(" ")
        if len(fields) != 5 or " ".join(fields[:2]) != MAGIC:
            return None, [], 0
        try:
            head = (int(fields[2][1:]), int(fields[3][1:]), int(fields[4][1:]))
        except ValueError:
            return None, [], 0
        body = lines[1:]
    else:
        body = lines
    records = []
    for line in body:
        modseq, _, uid = line.partition(" ")
        try:
            records.append((int(modseq), int(uid)))
        except ValueError:
            continue
    return head, records, len(lines)
