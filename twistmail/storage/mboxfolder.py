# -*- test-case-name: tests.test_mbox -*-
"""One mbox folder as an L{IMailbox}: the index, reconciling with the file, writes.

The mbox file is the truth for messages and flags; the sidecar index
(L{twistmail.storage._mboxindex}) adds UIDs and makes opening a big folder
cheap.  Every operation that touches the file runs in one worker-thread trip
under the mailbox lock (L{twistmail.storage._locking}) and first
*reconciles*: the file's (inode, size, mtime) stamp is compared with the one
we left it with.  Unchanged: nothing to read.  Grown, with the messages we
know still in place: another program appended; only the new tail is parsed
(a delivery, procmail, mutt saving a message).  Anything else (mutt
rewrote the file, a restore): the whole file is parsed again, and UIDs are
kept for the messages found again (by X-UIDL, then by X-UID, then by their
place), in file order; a message that cannot keep its UID gets a new one and
so do the ones after it, so UIDs stay ascending.

How each operation changes the file:

* append (IMAP APPEND, COPY, SMTP delivery): written at the end and fsynced,
  O(message).  Deliveries go through the store without UIDs, as another
  program's would; a refresh gives them UIDs.
* flag changes: the fixed-width Status/X-Status/X-Keywords lines are
  rewritten in place; only when keywords outgrow their room is the file
  rewritten.
* expunge (and that rare rewrite): the new file is written beside the old
  one, fsynced and renamed over it, the directory fsynced, all under the
  lock, so a crash leaves the old or the new complete file.

The in-memory index is only changed on the reactor thread, under the
folder's DeferredLock; worker trips read it while holding that lock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from twistmail import _fsutil
from twistmail.errors import NoSuchFolder, NoSuchMessage, StorageError
from twistmail.interfaces import IImportableMailbox, IModSeqMailbox
from twistmail.model import FolderChanges, StoredMessage
from twistmail.storage import _mboxformat as fmt
from twistmail.storage import _mboxindex as index
from twistmail.storage import _mboxio as mboxio
from twistmail.storage._filestore import FolderIndex
from twistmail.storage._mboxindex import Entry, Stamp, stampOf
from twistmail.storage._uidlist import newUidValidity

log = Logger()

#: Length of the fixed part of the flags region (all but the keywords' value).
_REGION_FIXED = len(fmt.flagsRegion((), keywordWidth=0)) - fmt.KEYWORD_ROOM
#: uidvalidity file of an mbox account (a dot name: never a folder's file name).
UIDVALIDITY = ".uidvalidity"
_newTuple = tuple.__new__

def modseqPath(path: str) -> str:
    """The RFC 7162 modseq journal (L{twistmail.storage._modseq}) of the mbox at C{path}."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.modseq")


# -- the folder ------------------------------------------------------------------------------


@dataclass
class _Sync:
    """What a worker trip found and did, applied to the index on the reactor thread."""

    full: dict | None = None  # every message (after a full parse, an expunge, a first load)
    added: list = field(default_factory=list)  # (uid, Entry): new at the end
    updated: list = field(default_factory=list)  # (uid, Entry): flags changed in place
    uidValidity: int = 0
    uidNext: int = 0
    keywords: list = field(default_factory=list)
    stamp: Stamp | None = None
    journal: int = 0
    unchanged: bool = False
    result: object = None  # the operation's own result
    own: set = field(default_factory=set)  # uids whose flags this trip changed itself


@implementer(IImportableMailbox, IModSeqMailbox)
class MboxFolder(FolderIndex):
    """One folder's shared index: every session on the folder sees this object."""

    maxKeywords = None  # X-Keywords has no limit

    def __init__(self, store, account: str, name: str, path: str, accountRoot: str) -> None:
        super().__init__(store, account, name, path, accountRoot)
        directory, base = os.path.split(path)
        self._indexPath = os.path.join(directory, f".{base}.index")
        self._stamp: Stamp | None = None
        self._journal = 0
        self._loaded = False

    @property
    def modseqPath(self) -> str:
        return modseqPath(self.path)

    def watchTargets(self) -> list[tuple[str, str | None]]:
        return [os.path.split(self.path)]

    # -- reading ---------------------------------------------------------------

    def _message(self, uid: int, e: Entry) -> StoredMessage:
        return _newTuple(StoredMessage, (uid, e.uniqueId, e.flags, e.size, e.internalDate,
                                         self._modseqs.byUid.get(uid, 1)))

    # -- applying a worker's findings (reactor thread) ----------------------------

    def _apply(self, sync: _Sync):
        if sync.unchanged:
            return FolderChanges()
        validityChanged = bool(self.uidValidity) and sync.uidValidity != self.uidValidity
        old = self._entries
        if sync.full is not None:
            new = sync.full
            self._entries = new
            removed = tuple(u for u in old if u not in new)
            changes = FolderChanges(
                added=tuple(u for u in new if u not in old),
                removed=removed,
                flagsChanged=tuple(u for u, e in new.items() if u in old and old[u].flags != e.flags),
                uidValidityChanged=validityChanged,
                expunged=self._expunged(old, removed))
        else:
            flagsChanged = []
            for uid, e in sync.updated:
                if uid in old:
                    if old[uid].flags != e.flags:
                        flagsChanged.append(uid)
                    old[uid] = e
            for uid, e in sync.added:
                old[uid] = e
            changes = FolderChanges(added=tuple(uid for uid, _ in sync.added),
                                    flagsChanged=tuple(flagsChanged))
        self.uidValidity, self.uidNext = sync.uidValidity, sync.uidNext
        self._keywords, self._stamp, self._journal = sync.keywords, sync.stamp, sync.journal
        self._loaded = True
        d = self._changed(changes, own=sync.own)
        return d.addCallback(lambda ignored: changes if sync.result is None else sync.result)

    # -- worker side: reconciling with the file --------------------------------------

    def _fileLock(self, exclusive: bool):
        return self._store._mailboxLock(self.path, exclusive)

    def _state(self) -> index.Index | None:
        if self._loaded:
            return index.Index(self.uidValidity, self.uidNext, self._entries, self._keywords,
                               self._stamp, self._journal)
        return index.read(self._indexPath)

    def _refreshSync(self) -> _Sync:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchFolder(self.name) from None
        if self._loaded and stampOf(st) == self._stamp:
            return _Sync(unchanged=True)
        try:
            with self._fileLock(exclusive=False) as lock:
                return self._reconcile(lock.fd)
        except FileNotFoundError:
            raise NoSuchFolder(self.name) from None

    def _reconcile(self, fd: int) -> _Sync:
        """Bring the index up to date with the locked file C{fd} (see the module docstring)."""
        st = os.fstat(fd)
        state = self._state()
        sync = _Sync(uidValidity=state.uidValidity if state else 0,
                     uidNext=state.uidNext if state else 1,
                     keywords=list(state.keywords) if state else [],
                     stamp=state.stamp if state else None,
                     journal=state.journal if state else 0)
        if state is not None and state.stamp == stampOf(st):
            if not self._loaded:
                sync.full = state.entries
            return sync
        tail = self._tailStart(fd, st, state)
        with mboxio.Map(fd, st.st_size) as buf:
            if tail is not None:
                self._adoptTail(buf, st, state, tail, sync)
            else:
                self._parseAll(buf, st, state, sync)
        return sync

    def _tailStart(self, fd: int, st, state) -> int | None:
        """Where other programs' new messages start, if all they did was append."""
        if state is None or state.stamp is None:
            return None
        known = state.stamp
        if st.st_ino != known.inode or st.st_size <= known.size:
            return None
        if state.entries:
            last = state.entries[next(reversed(state.entries))]
            try:
                mboxio.verify(os.pread(fd, last.end - last.offset, last.offset), last)
            except mboxio.Moved:
                return None
        head = os.pread(fd, 4096, known.size)
        start = known.size + len(head) - len(head.lstrip(b"\n"))
        return start if head.lstrip(b"\n").startswith(b"From ") else None

    def _adoptTail(self, buf, st, state, start: int, sync: _Sync) -> None:
        size = st.st_size
        complete = buf[size - 1:size] == b"\n"
        found = fmt.parse(buf, start, size, int(st.st_mtime))
        if not complete and found:
            size = found.pop().offset  # still being written by a program that ignores locks
        uid, lines = sync.uidNext, []
        keywords = set(sync.keywords)
        used = {e.uniqueId for e in state.entries.values()}
        for m in found:
            # mutt copying one of our messages copies its X-UIDL: a UIDL must stay unique.
            uidl = m.uniqueId if m.uniqueId not in used else None
            e = _entry(m, uidl or mboxio.uniqueId(), uidl is not None)
            used.add(e.uniqueId)
            sync.added.append((uid, e))
            lines.append(index.entryLine(uid, e))
            keywords.update(f for f in e.flags if not f.startswith("\\"))
            uid += 1
        sync.uidNext = uid
        sync.stamp = stampOf(st) if complete else Stamp(st.st_ino, size, 0)
        if keywords != set(sync.keywords):
            sync.keywords = sorted(keywords)
            lines.append(index.keywordsLine(sync.keywords))
        if not self._loaded:
            sync.full = dict(state.entries)
            sync.full.update(sync.added)
        self._record(sync, lines + [index.stampLine(sync.stamp, sync.uidNext)], durable=True)

    def _parseAll(self, buf, st, state, sync: _Sync) -> None:
        found = fmt.parse(buf, 0, st.st_size, int(st.st_mtime))
        base = found[0].base if found else None
        old = state.entries if state else {}
        validity = state.uidValidity if state else (base[0] if base else 0)
        trustXUid = base is not None and base[0] == validity
        uidNext = max(state.uidNext if state else 1, base[1] if trustXUid else 1)
        if trustXUid:
            uidNext = max([uidNext] + [m.xUid + 1 for m in found if m.xUid])
        if not validity:
            validity = newUidValidity(self._accountRoot, UIDVALIDITY)
        byUidl = {e.uniqueId: u for u, e in old.items()}
        byPlace = {(e.offset, e.size): u for u, e in old.items()}
        entries: dict[int, Entry] = {}
        keywords = set(sync.keywords) | set(base[2] if base else ())
        last, renumber = 0, False
        used: set[str] = set()
        for m in found:
            uidl = m.uniqueId if m.uniqueId not in used else None  # a copy's is not its own
            candidate = byUidl.get(uidl) if uidl else byPlace.get((m.offset, m.size))
            if candidate is None and trustXUid:
                candidate = m.xUid
            known = old.get(candidate)
            if not renumber and candidate is not None and last < candidate < uidNext and (
                    known is None or known.size == m.size and uidl in (None, known.uniqueId)):
                uid = candidate
            else:
                uid, renumber = uidNext, True
                uidNext += 1
            last = uid
            known = old.get(uid)
            unique = uidl or (known.uniqueId if known and known.uniqueId not in used
                              else mboxio.uniqueId())
            used.add(unique)
            e = _entry(m, unique, uidl is not None)
            entries[uid] = e
            keywords.update(f for f in e.flags if not f.startswith("\\"))
        sync.full = entries
        sync.uidValidity, sync.uidNext, sync.keywords = validity, uidNext, sorted(keywords)
        sync.stamp = stampOf(st)
        self._rewriteIndex(sync)

    # -- worker side: the index file ----------------------------------------------------

    def _rewriteIndex(self, sync: _Sync) -> None:
        entries = sync.full if sync.full is not None else self._merged(sync)
        index.write(self._indexPath, sync.uidValidity, sync.uidNext, entries, sync.keywords,
                    sync.stamp)
        sync.journal = len(entries) + 3

    def _merged(self, sync: _Sync) -> dict:
        entries = dict(self._entries)
        entries.update(sync.updated)
        entries.update(sync.added)
        return entries

    def _record(self, sync: _Sync, lines: list[str], durable: bool) -> None:
        """Journal C{lines}, or rewrite the index when the journal has grown long."""
        count = len(sync.full) if sync.full is not None else len(self._entries) + len(sync.added)
        if sync.journal + len(lines) > 2 * count + 1000:
            self._rewriteIndex(sync)
            return
        try:
            index.append(self._indexPath, lines, durable)
        except FileNotFoundError:
            self._rewriteIndex(sync)
            return
        sync.journal += len(lines)

    # -- refresh -----------------------------------------------------------------------------

    def refresh(self) -> defer.Deferred:
        return self._lock.run(self._locked, self._refreshSync)

    def _locked(self, work, *args) -> defer.Deferred:
        """Run C{work} in a worker thread and apply what it returns (folder lock held)."""
        return self._store._run(work, *args).addCallback(self._apply)

    def _exclusive(self, work, *args) -> _Sync:
        """Worker: under the write lock, reconcile, then C{work(fd, sync, *args)}."""
        try:
            with self._fileLock(exclusive=True) as lock:
                sync = self._reconcile(lock.fd)
                sync.result = work(lock.fd, sync, *args)
                return sync
        except FileNotFoundError:
            raise NoSuchFolder(self.name) from None

    def _current(self, sync: _Sync) -> dict:
        """Every message as the worker trip sees it now."""
        if sync.full is not None:
            return sync.full
        return self._merged(sync) if sync.added or sync.updated else self._entries

    # -- reading messages ------------------------------------------------------------------

    def _entry(self, uid: int) -> Entry:
        e = self._entries.get(uid)
        if e is None:
            raise NoSuchMessage(uid)
        return e

    def _withRetry(self, read, uids) -> defer.Deferred:
        """Run C{read(path, entries)} in a worker; if the file changed under it, refresh and retry once."""
        def attempt():
            return self._store._run(read, self.path, [self._entry(uid) for uid in uids])

        def moved(failure):
            failure.trap(mboxio.Moved, FileNotFoundError)
            return self.refresh().addCallback(lambda ignored: defer.maybeDeferred(attempt))

        d = defer.maybeDeferred(attempt).addErrback(moved)
        return d.addErrback(self._unreadable)

    def _unreadable(self, failure):
        if failure.check(mboxio.Moved, FileNotFoundError):
            raise StorageError(f"{self.name} changed while being read; try again")
        return failure

    def readMessages(self, uids) -> defer.Deferred:
        return self._withRetry(mboxio.readAll, list(uids))

    def openMessage(self, uid: int) -> defer.Deferred:
        return self._withRetry(lambda path, entries: mboxio.openContent(path, entries[0]), [uid])

    # -- flags ---------------------------------------------------------------------------------

    def _setFlags(self, uids: set, flags: frozenset, mode: str) -> defer.Deferred:
        bad = [f for f in flags if not f.startswith("\\") and not fmt.validKeyword(f)]
        if bad:
            return defer.fail(StorageError(f"invalid keyword {bad[0]!r}"))
        uids = set(uids)

        def done(result):
            return [self._message(u, self._entries[u]) for u in sorted(uids) if u in self._entries]

        return self._locked(self._exclusive, self._setFlagsSync, uids, flags, mode).addCallback(done)

    def _setFlagsSync(self, fd: int, sync: _Sync, uids: set, flags: frozenset, mode: str) -> None:
        entries = self._current(sync)
        changed = {}
        for uid in sorted(uids.intersection(entries)):
            current = entries[uid].flags
            wanted = flags if mode == "set" else current | flags if mode == "add" else current - flags
            if wanted != current:
                changed[uid] = frozenset(wanted)
        if not changed:
            return
        sync.own = set(changed)
        keywords = set(sync.keywords)
        for wanted in changed.values():
            keywords.update(f for f in wanted if not f.startswith("\\"))
        sync.keywords = sorted(keywords)
        writes = []
        for uid, wanted in changed.items():
            e = entries[uid]
            region = fmt.flagsRegion(wanted, max(0, e.flagsLen - _REGION_FIXED))
            if len(region) != e.flagsLen:
                # No room (or another program's fields): rewrite the file once for all.
                self._rewrite(fd, sync, entries, set(), changed)
                return
            writes.append((uid, e, region))
        for uid, e, region in writes:
            mboxio.writeAll(fd, region, e.flagsAt)
            sync.updated.append((uid, e._replace(flags=changed[uid])))
        if sync.full is not None:
            sync.full.update(sync.updated)
        sync.stamp = stampOf(os.fstat(fd))
        lines = [f"f\t{uid}\t{index.encodeFlags(changed[uid])}\n" for uid, _, _ in writes]
        self._record(sync, [index.keywordsLine(sync.keywords), *lines,
                            index.stampLine(sync.stamp, sync.uidNext)], durable=False)

    # -- expunge and rewrites ----------------------------------------------------------------

    def remove(self, uids) -> defer.Deferred:
        return self._lock.run(self._locked, self._exclusive, self._removeSync, set(uids))

    def _removeSync(self, fd: int, sync: _Sync, uids: set) -> list[int]:
        entries = self._current(sync)
        gone = sorted(uids.intersection(entries))
        if gone:
            self._rewrite(fd, sync, entries, set(gone), {})
        return gone

    def _rewrite(self, fd: int, sync: _Sync, entries: dict, drop: set, flags: dict) -> None:
        """Write the folder anew without C{drop}, with C{flags} (uid -> flags), and rename it
        over the old file: a crash leaves one complete file or the other."""
        directory, base = os.path.split(self.path)
        # One fixed name is safe here, unlike atomicWrite's: only the holder of the
        # exclusive lock (which excludes this process's other threads too) writes it,
        # and the next rewrite reuses what a crash left behind.
        tmp = os.path.join(directory, f".{base}.rewrite")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                      os.fstat(fd).st_mode & 0o777)
        kept: dict[int, Entry] = {}
        try:
            pos = 0
            for uid, e in entries.items():
                if uid in drop:
                    continue
                base = (sync.uidValidity, sync.uidNext, sync.keywords) if pos == 0 else None
                kept[uid], pos = mboxio.copyMessage(fd, out, pos, uid, e,
                                                    flags.get(uid, e.flags), base)
            os.fsync(out)
            st = os.fstat(out)
        except BaseException as e:
            os.close(out)
            os.unlink(tmp)
            if isinstance(e, OSError):
                raise StorageError(f"cannot rewrite {self.name}: {e.strerror}") from e
            raise
        os.close(out)
        os.rename(tmp, self.path)
        _fsutil.fsyncDir(directory)
        sync.full, sync.added, sync.updated = kept, [], []
        sync.stamp = stampOf(st)
        self._rewriteIndex(sync)

    # -- appending ---------------------------------------------------------------------------

    def append(self, source, flags=(), internalDate: float | None = None) -> defer.Deferred:
        flags = frozenset(flags)
        bad = [f for f in flags if not f.startswith("\\") and not fmt.validKeyword(f)]
        if bad:
            return defer.fail(StorageError(f"invalid keyword {bad[0]!r}"))
        out = mboxio.Outgoing(lambda: mboxio.chunks(source), flags,
                              time.time() if internalDate is None else internalDate,
                              mboxio.uniqueId())
        return self._lock.run(self._locked, self._exclusive, self._appendSync,
                              [out]).addCallback(lambda uids: uids[0])

    def importMessages(self, messages) -> defer.Deferred:
        """Appends keeping each message's POP3 UIDL where it can be an X-UIDL."""
        known = {e.uniqueId for e in self._entries.values()}
        outs = []
        for source, flags, internalDate, unique in messages:
            flags = frozenset(flags)
            bad = [f for f in flags if not f.startswith("\\") and not fmt.validKeyword(f)]
            if bad:
                return defer.fail(StorageError(f"invalid keyword {bad[0]!r}"))
            if unique in known or not fmt.validUidl(unique):
                unique = mboxio.uniqueId()
            known.add(unique)
            outs.append(mboxio.Outgoing(lambda source=source: mboxio.chunks(source), flags,
                                        internalDate, unique))
        return self._lock.run(self._locked, self._exclusive, self._appendSync, outs)

    def copyMessages(self, uids, target: MboxFolder) -> defer.Deferred:
        """Copies keep flags, dates and POP3 UIDLs; all or none (RFC 3501 §6.4.7)."""
        try:
            sources = [(uid, self._entry(uid)) for uid in uids]
        except NoSuchMessage:
            return defer.fail()
        path = self.path

        def reading(fd: int, e: Entry):
            return lambda: [mboxio.readContent(fd, e)]

        def work(fd: int, sync: _Sync) -> list[int]:
            sourceFd = fd if target is self else os.open(path, os.O_RDONLY)
            try:
                outs = [mboxio.Outgoing(reading(sourceFd, e), e.flags, e.internalDate,
                                        mboxio.uniqueId()) for _, e in sources]
                return target._appendSync(fd, sync, outs)
            finally:
                if sourceFd != fd:
                    os.close(sourceFd)

        def run():
            d = target._locked(target._exclusive, work)
            return d.addCallback(lambda newUids: list(zip([u for u, _ in sources], newUids,
                                                          strict=True)))

        # Both folders stay locked, always taken in the same order (no deadlock).
        if target is self:
            d = self._lock.run(run)
        else:
            first, second = sorted((self, target), key=lambda f: (f.account, f.name))
            d = first._lock.run(lambda: second._lock.run(run))
        return d.addErrback(self._unreadable)

    def _appendSync(self, fd: int, sync: _Sync, outs: list[mboxio.Outgoing]) -> list[int]:
        uid = sync.uidNext
        for out in outs:
            out.uid, uid = uid, uid + 1
        try:
            written = mboxio.writeMessages(fd, outs, (sync.uidValidity, uid, sync.keywords))
        except mboxio.Moved:
            raise NoSuchMessage("a message to copy changed meanwhile") from None
        added = [(out.uid, e) for out, e in zip(outs, written, strict=True)]
        sync.added.extend(added)
        sync.uidNext = uid
        sync.stamp = stampOf(os.fstat(fd))
        lines = [index.entryLine(u, e) for u, e in added]
        keywords = set(sync.keywords)
        for out in outs:
            keywords.update(f for f in out.flags if not f.startswith("\\"))
        if keywords != set(sync.keywords):
            sync.keywords = sorted(keywords)
            lines.append(index.keywordsLine(sync.keywords))
        if sync.full is not None:
            sync.full.update(added)
        self._record(sync, lines + [index.stampLine(sync.stamp, sync.uidNext)], durable=True)
        return [u for u, _ in added]


def _entry(m: fmt.Parsed, unique: str, hasUidl: bool) -> Entry:
    """@param hasUidl: whether C{unique} is the X-UIDL in the message's block."""
    return Entry(m.offset, m.contentAt, m.flagsAt, m.flagsLen, m.skipFrom, m.skipTo, m.joint, m.end,
                 m.size, m.quoted, m.internalDate, unique, hasUidl, m.flags)

