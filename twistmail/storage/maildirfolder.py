# -*- test-case-name: tests.test_maildir -*-
"""One Maildir folder as an L{IMailbox}: the UID index, flags, appends, expunges.

The folder's messages are ``cur/<base>:2,<info>`` files: the base name never
changes, the info letters are the flags (cr.yp.to), and ``twistmail-uidlist``
(see L{twistmail.storage._uidlist}) keeps the UID of each base name.

Keeping up with a 100,000-message folder without rereading it: a scan
remembers the modification times of ``new/`` and ``cur/``.  A refresh that
finds both unchanged costs two stat() calls; one that finds only ``new/``
changed (a delivery) moves the newcomers and gives them UIDs without listing
``cur/``; only a change to ``cur/`` by another program (a flag rename by
mutt, a restore) costs a full listing.  Our own changes to ``cur/`` are
bracketed by stat() calls so they do not count as foreign; and because a
foreign change could slip in between our change and the stat after it, a
full scan is also made whenever the last one is older than
C{FULL_SCAN_INTERVAL}.  While someone listens (an IMAP client in IDLE),
inotify (or a poll where there is none; L{twistmail.storage._filestore}) triggers the refresh, so another
program's writes show up within a second.

Every blocking call runs in the thread pool under the folder's lock; the
in-memory index is only changed on the reactor thread.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
from bisect import bisect_left
from functools import partial
from itertools import repeat
from operator import itemgetter, methodcaller

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from twistmail import _fsutil, _gcpause
from twistmail._groupcommit import NewFile, commitBatch, writeNewFile
from twistmail.errors import NoSuchFolder, NoSuchMessage, StorageError, TooManyKeywords
from twistmail.interfaces import IImportableMailbox, IModSeqMailbox
from twistmail.model import FolderChanges, StoredMessage
from twistmail.storage import _maildirindex, _uidlist
from twistmail.storage._filestore import FolderIndex

log = Logger()

# Maildir info letters (cr.yp.to): must be kept in ASCII order in the file name.
_FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
_LETTER_FLAGS = {v: k for k, v in _FLAG_LETTERS.items()}
_LETTER_FLAGS["P"] = "$Forwarded"  # "passed" in Maildir, $Forwarded keyword in IMAP
MAX_KEYWORDS = 26
#: Times a message renamed under a reader is looked for again before it counts as gone.
OPEN_TRIES = 3
#: Seconds after which a refresh rescans cur/ even if its mtime says nothing changed.
FULL_SCAN_INTERVAL = 300.0

_counter = itertools.count()
#: What another store's unique id must look like to become a Maildir base name.
_USABLE_BASE = re.compile(r"[A-Za-z0-9_\\-][A-Za-z0-9._\\-]{0,69}")
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
#: Files whose changes make twistmail-index stale, beside new/ and cur/.
_SIDECARS = (_uidlist.UIDLIST, _uidlist.KEYWORDS)
_ORDER = re.compile(r"(\d+)\.(?:M(\d+))?(?:P\d+)?(?:Q(\d+))?")
_partitionDot, _partitionComma = methodcaller("partition", "."), methodcaller("partition", ",")
_partitionSize = methodcaller("partition", ",S=")
_partitionInfo = methodcaller("partition", ":2,")
_LAST = float("inf")  # sort key of a name without a delivery time
_TEN, _ELEVENTH = itemgetter(slice(0, 10)), itemgetter(slice(10, 11))


def uniqueName() -> str:
    """A Maildir unique name: time.M<usec>P<pid>Q<n>.host (unique per host, no locking)."""
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def _inDeliveryOrder(bases) -> tuple[list[str], list[int | None], list[int | None]]:
    """C{bases} sorted by the delivery time in their names, seconds then microseconds
    and counter compared as numbers (M99 < M100), other names last, ties by name;
    with the seconds (None if the name has none) and the ``,S=`` size (None if none).

    For the 100,000 names of a first SELECT: the usual names all start with ten
    digits, so their string order is their order by seconds and the seconds are
    parsed by C-level maps; only names that share a second are parsed for their
    microseconds and counter.
    """
    bases = sorted(bases)  # names from one program sort nearly in time order: a cheap sort
    seconds = _tenDigitSeconds(bases)
    if seconds is None:  # names of several kinds: order them by the seconds as numbers
        seconds = [int(h) if h.isdigit() and h.isascii() else None
                   for h in map(_FIRST, map(_partitionDot, bases))]
        keys = [_LAST if sec is None else sec for sec in seconds]
        order = sorted(range(len(bases)), key=keys.__getitem__)  # stable: ties stay by name
        bases, seconds = list(map(bases.__getitem__, order)), list(map(seconds.__getitem__, order))
    if len(set(seconds)) < len(seconds):  # some share a second: their microseconds decide
        start = 0
        for end in range(1, len(bases) + 1):
            if end == len(bases) or seconds[end] != seconds[start]:
                if end - start > 1 and seconds[start] is not None:
                    bases[start:end] = sorted(bases[start:end], key=_subSecond)
                start = end
    return bases, seconds, _sizes(bases)


def _tenDigitSeconds(bases: list[str]) -> list[int] | None:
    """The seconds of each name if every name starts with ten ASCII digits and a dot
    (``<seconds>.``, any Maildir name made from 2001 to 2286), else None."""
    heads = list(map(_TEN, bases))
    digits = "".join(heads)
    if (len(digits) != 10 * len(bases) or not (digits.isascii() and digits.isdigit())
            or set(map(_ELEVENTH, bases)) - {"."}):
        return None
    return list(map(int, heads))


def _sizes(bases: list[str]) -> list[int | None]:
    """The ``,S=<size>`` of each name (None if it has none), by C-level maps when all have one."""
    tails = list(map(_FIRST, map(_partitionComma, map(_THIRD, map(_partitionSize, bases)))))
    digits = "".join(tails)
    if all(tails) and digits.isascii() and digits.isdigit():
        return list(map(int, tails))
    return [int(t) if t.isdigit() and t.isascii() else None for t in tails]


def _subSecond(base: str) -> tuple[int, int]:
    """Microseconds and counter of a name, for deliveries within one second."""
    m = _ORDER.match(base)
    return (int(m.group(2) or 0), int(m.group(3) or 0)) if m else (0, 0)


def splitName(filename: str) -> tuple[str, str]:
    """``base:2,FS`` -> (base, "FS")."""
    base, sep, info = filename.partition(":2,")
    return base, info if sep else ""


def _sizeFromBase(base: str) -> int | None:
    """The ``,S=<size>`` part of a base name (Maildir++), without a per-part loop."""
    at = base.find(",S=")
    if at < 0:
        return None
    end = base.find(",", at + 3)
    digits = base[at + 3:] if end < 0 else base[at + 3:end]
    return int(digits) if digits.isdigit() else None


def makeMaildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def stageMessage(folderPath: str, chunks, subdir: str, suffix: str = "",
                 internalDate: float | None = None) -> NewFile:
    """Write C{tmp/<unique>}; L{commitBatch} makes it durable and renames it into C{subdir}."""
    name = uniqueName()
    tmp = os.path.join(folderPath, "tmp", name)
    size = writeNewFile(tmp, chunks, internalDate)
    return NewFile(tmp, os.path.join(folderPath, subdir, f"{name},S={size}{suffix}"))


_newTuple = tuple.__new__
_newStored = partial(tuple.__new__, StoredMessage)
_BASE, _INFO, _SIZE, _DATE = (itemgetter(i) for i in range(4))  # of an _Entry
_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)


def _columns(entries: dict) -> tuple[list, list, list, list, list]:
    """(uids, bases, infos, sizes, dates) of C{entries}: the index's columns, the uidlist's."""
    values = list(entries.values())
    return (list(entries), list(map(_BASE, values)), list(map(_INFO, values)),
            list(map(_SIZE, values)), list(map(_DATE, values)))


def _rows(columns: tuple[list, list, list, list, list]):
    """The uidlist rows (uid, date, size, base) of L{_columns}."""
    uids, bases, _, sizes, dates = columns
    return zip(uids, dates, sizes, bases, strict=True)


def _datesAndSizesFromStat(curDir: str, bases: list, infos: list, sizes: list, dates: list) -> tuple:
    """The columns with INTERNALDATE (mtime), and the size where the name has none, from
    stat() for each name that lacks a delivery time or a size; names gone meanwhile left out."""
    kept: tuple[list, list, list, list] = ([], [], [], [])
    for base, info, size, date in zip(bases, infos, sizes, dates, strict=True):
        if date is None or size is None:
            try:
                st = os.stat(f"{curDir}/{base}:2,{info}")
            except FileNotFoundError:
                continue
            date = int(st.st_mtime)
            if size is None:
                size = st.st_size
        for column, value in zip(kept, (base, info, size, date), strict=True):
            column.append(value)
    return kept


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def _chunks(source):
    """A message given as bytes or as a MessageSource."""
    return [source] if isinstance(source, (bytes, bytearray, memoryview)) else source.chunks()


class _Entry(list):
    """[base, info, size, internal date] of one message.

    A list, not an object with C{__init__}: a 100,000-message folder builds its
    entries with C{map(_Entry, zip(...))}, all in C, and the attributes are
    C-level item getters.  C{info} holds the flag letters after ':2,' (system
    letters upper case, keywords a-z).
    """

    __slots__ = ()
    base = property(itemgetter(0))
    info = property(itemgetter(1), lambda self, value: self.__setitem__(1, value))
    size = property(itemgetter(2))
    internalDate = property(itemgetter(3))

    @property
    def uniqueId(self) -> str:
        return self[0].split(",", 1)[0]  # POP3 UIDL: the name without its ,S= size


class _Scan:
    """What a worker-thread scan found, applied to the index on the reactor thread."""

    def __init__(self) -> None:
        self.unchanged = False
        self.entries: dict[int, _Entry] | None = None  # full scan: every message
        self.added: list[tuple[int, _Entry]] = []  # incremental: newcomers only
        self.uidValidity = 0
        self.uidNext = 0
        self.keywords: list[str] | None = None
        self.stamps = None
        self.full = False
        self.columns: tuple[list, ...] | None = None  # of the entries, for the index
        self.index: bytes | None = None  # twistmail-index, encoded: worth saving


@implementer(IImportableMailbox, IModSeqMailbox)
class MaildirFolder(FolderIndex):
    """One folder's shared index: every session on the folder sees this object."""

    maxKeywords = MAX_KEYWORDS

    def __init__(self, store, account: str, name: str, path: str, accountRoot: str) -> None:
        super().__init__(store, account, name, path, accountRoot)
        self._byBaseMap: dict[str, int] | None = {}
        self._flagCache: dict[str, frozenset] = {}
        self._stamps: tuple | None = None  # (new/, cur/) as of our last scan or own change
        self._fullScanAt = float("-inf")

    @property
    def _byBase(self) -> dict[str, int]:
        """uid of each base name; built when first needed (a delivery, an import), not at
        every full scan: a SELECT of 100,000 messages need not pay for it."""
        if self._byBaseMap is None:
            entries = self._entries
            self._byBaseMap = dict(zip(map(_BASE, entries.values()), entries, strict=True))
        return self._byBaseMap

    @property
    def modseqPath(self) -> str:
        return os.path.join(self.path, _uidlist.MODSEQ)

    def watchTargets(self) -> list[tuple[str, str | None]]:
        return [(os.path.join(self.path, "new"), None), (os.path.join(self.path, "cur"), None)]

    # -- reading ---------------------------------------------------------------

    def _flags(self, info: str) -> frozenset:
        flags = self._flagCache.get(info)
        if flags is None:
            found = set()
            for letter in info:
                if letter in _LETTER_FLAGS:
                    found.add(_LETTER_FLAGS[letter])
                elif "a" <= letter <= "z" and ord(letter) - 97 < len(self._keywords):
                    found.add(self._keywords[ord(letter) - 97])
            flags = self._flagCache[info] = frozenset(found)
        return flags

    def _message(self, uid: int, entry: _Entry) -> StoredMessage:
        # tuple.__new__ directly: NamedTuple's own __new__ is a Python function, and a
        # 100,000-message SELECT makes 100,000 of these.
        return _newTuple(StoredMessage, (uid, entry.uniqueId, self._flags(entry.info), entry.size,
                                         entry.internalDate, self._modseqs.byUid.get(uid, 1)))

    def messages(self) -> list:
        """The snapshot built with C-level maps over the entry columns: no Python call
        per message (100,000 of them at the first FETCH after a SELECT)."""
        if self._snapshot is None:
            entries = self._entries
            values = list(entries.values())
            infos = list(map(_INFO, values))
            for info in set(infos):
                self._flags(info)
            uniqueIds = map(_FIRST, map(str.partition, map(_BASE, values), repeat(",")))
            with _gcpause.paused(len(values)):
                self._snapshot = list(map(_newStored, zip(
                    entries, uniqueIds, map(self._flagCache.__getitem__, infos),
                    map(_SIZE, values), map(_DATE, values),
                    map(self._modseqs.byUid.get, entries, repeat(1)), strict=True)))
        return self._snapshot

    def _buildFlagColumn(self) -> list:
        """From the entries' info letters through the flag cache, without the snapshot:
        SELECT and FLAGS-only FETCH of 100,000 messages need not build 100,000 tuples."""
        infos = list(map(_INFO, self._entries.values()))
        for info in set(infos):
            self._flags(info)
        return list(map(self._flagCache.__getitem__, infos))

    # -- refresh: reconcile the index with the directory ------------------------

    def refresh(self) -> defer.Deferred:
        return self._lock.run(self._refresh)

    def _refresh(self) -> defer.Deferred:
        full = time.monotonic() - self._fullScanAt > FULL_SCAN_INTERVAL
        return self._store._run(self._whileThere, self._scanSync, full).addCallback(
            self._applyScan)

    def _whileThere(self, work, *args):
        """Worker: C{work(*args)}; if another session deletes or renames the folder under
        it (and perhaps creates one of that name again), L{NoSuchFolder}, a clear
        NO [NONEXISTENT], instead of the error a vanished file made."""
        cur = os.path.join(self.path, "cur")
        try:
            before = os.stat(cur).st_ino
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchFolder(self.name) from None
        try:
            return work(*args)
        except (FileNotFoundError, NotADirectoryError, StorageError) as e:
            if isinstance(e, (NoSuchFolder, NoSuchMessage)):
                raise
            try:
                if os.stat(cur).st_ino == before:
                    raise
            except (FileNotFoundError, NotADirectoryError):
                pass
            raise NoSuchFolder(self.name) from None

    def _scanSync(self, forceFull: bool) -> _Scan:
        """Worker thread, under the lock: move new/ to cur/, assign UIDs to newcomers."""
        newDir, curDir = os.path.join(self.path, "new"), os.path.join(self.path, "cur")
        try:
            before = (_stamp(newDir), _stamp(curDir))
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchFolder(self.name) from None
        scan = _Scan()
        known = self._stamps
        if not forceFull and known is not None and before == known:
            scan.unchanged = True
            return scan
        if known is None and self._fromIndex(scan):
            scan.stamps = before
            return scan
        moved = []
        for name in os.listdir(newDir):
            if name.startswith("."):
                continue
            try:
                os.rename(os.path.join(newDir, name), os.path.join(curDir, name + ":2,"))
            except FileNotFoundError:
                continue  # another process took it
            moved.append(name)
        if forceFull or known is None or before[1] != known[1]:
            self._fullScan(scan, curDir)
        else:
            self._adopt(scan, curDir, moved)
        taken = _maildirindex.now()
        scan.stamps = (_stamp(newDir), _stamp(curDir))
        if (scan.full and scan.stamps == before
                and len(scan.entries) >= _maildirindex.MIN_MESSAGES):
            # Nothing changed while we listed: what we found can be saved as the index.
            stamps = _maildirindex.stamps(self.path, _SIDECARS)
            if not _maildirindex.holds(self.path, stamps):
                # Encoded here (marshal holds the GIL for 100,000 entries), before the
                # SELECT answers, not in the background where it would stall what follows.
                scan.index = _maildirindex.encode(
                    stamps, taken, scan.uidValidity, scan.uidNext,
                    scan.columns if scan.columns is not None else _columns(scan.entries))
        return scan

    def _fromIndex(self, scan: _Scan) -> bool:
        """The first look at the folder in this process: from twistmail-index if it holds."""
        with _gcpause.paused():  # an index is there for 1,000 messages or more
            loaded = _maildirindex.load(self.path, _maildirindex.stamps(self.path, _SIDECARS))
            if loaded is None:
                return False
            uidValidity, uidNext, uids, bases, infos, sizes, dates = loaded
            scan.entries = dict(zip(uids, map(_Entry, zip(bases, infos, sizes, dates,
                                                          strict=True)), strict=True))
        scan.full = True
        scan.uidValidity, scan.uidNext = uidValidity, uidNext
        scan.keywords = _uidlist.readKeywords(self.path)
        return True

    def _fullScan(self, scan: _Scan, curDir: str) -> None:
        scan.full = True
        # Sorted, the hidden names ('.…') are one slice, and the base names come nearly
        # in the order _inDeliveryOrder sorts them: its sort is then cheap.
        names = sorted(os.listdir(curDir))
        del names[bisect_left(names, "."):bisect_left(names, "/")]
        with _gcpause.paused(len(names)):
            self._reconcile(scan, curDir, names)

    def _reconcile(self, scan: _Scan, curDir: str, names: list[str]) -> None:
        """Match the names in cur/ with the uidlist; number the newcomers."""
        parts = list(map(_partitionInfo, names))
        if "" in set(map(_SECOND, parts)):
            for name, (_, sep, _) in zip(names, parts, strict=True):
                if not sep:
                    # Put there without the info part by another program: give it one,
                    # so the file has the name the index expects.
                    try:
                        os.rename(os.path.join(curDir, name), os.path.join(curDir, name + ":2,"))
                    except FileNotFoundError:
                        continue
        onDisk: dict[str, str] = dict(zip(map(_FIRST, parts), map(_THIRD, parts), strict=True))
        uidlistPath = os.path.join(self.path, _uidlist.UIDLIST)
        header, listed = _uidlist.read(uidlistPath)
        if header is None:
            # No uidlist (new folder, or a restore): a fresh UIDVALIDITY invalidates
            # whatever clients cached (RFC 3501 §2.3.1.1).
            uidValidity, uidNext, listed = _uidlist.newUidValidity(self._accountRoot), 1, {}
            rewrite = True
        else:
            (uidValidity, uidNext), rewrite = header, False
        entries: dict[int, _Entry] = {}
        pop = onDisk.pop
        for uid in sorted(listed):
            base, date, size = listed[uid]
            info = pop(base, None)
            if info is not None:
                entries[uid] = _Entry((base, info, size, date))
        if len(entries) != len(listed):
            rewrite = True
        # What is left is not in the uidlist.
        allNew = not entries
        added = self._assign(curDir, onDisk, uidNext, entries)
        uidNext += len(added[0])
        if rewrite:
            scan.columns = added if allNew else _columns(entries)  # the index's too
            _uidlist.write(uidlistPath, uidValidity, uidNext, _rows(scan.columns))
        elif added[0]:
            _uidlist.append(uidlistPath, _rows(added))
        scan.entries = entries
        scan.uidValidity, scan.uidNext = uidValidity, uidNext
        scan.keywords = _uidlist.readKeywords(self.path)

    def _adopt(self, scan: _Scan, curDir: str, moved: list[str]) -> None:
        """Only new/ changed: give the newcomers UIDs without listing cur/."""
        newcomers = {n: "" for n in moved if n not in self._byBase}
        added: dict[int, _Entry] = {}
        columns = self._assign(curDir, newcomers, self.uidNext, added)
        if added:
            _uidlist.append(os.path.join(self.path, _uidlist.UIDLIST), _rows(columns))
        scan.added = list(added.items())
        scan.uidValidity, scan.uidNext = self.uidValidity, self.uidNext + len(added)

    def _assign(self, curDir: str, newcomers: dict[str, str], uidNext: int,
                into: dict) -> tuple[list, list, list, list, list]:
        """UIDs for C{newcomers} ({base: info}), in delivery order, from C{uidNext} on:
        their entries go into C{into}, their L{_columns} are returned.  INTERNALDATE is
        the delivery time in the name (``<seconds>.…``) when the name has one and a
        ``,S=`` size, so 100,000 newcomers cost no stat() each; only other names are
        stat()ed (mtime; Dovecot too takes it from the name's time where it can)."""
        bases, dates, sizes = _inDeliveryOrder(newcomers)
        infos = list(map(newcomers.__getitem__, bases))
        if None in dates or None in sizes:
            bases, infos, sizes, dates = _datesAndSizesFromStat(curDir, bases, infos, sizes, dates)
        uids = list(range(uidNext, uidNext + len(bases)))
        into.update(zip(uids, map(_Entry, zip(bases, infos, sizes, dates, strict=True)),
                        strict=True))
        return uids, bases, infos, sizes, dates

    def _applyScan(self, scan: _Scan) -> FolderChanges | defer.Deferred:
        if scan.unchanged:
            return FolderChanges()
        self._stamps = scan.stamps
        if scan.full:
            self._fullScanAt = time.monotonic()
            if scan.index is not None:
                self._saveIndex(scan.index)
            return self._applyFull(scan)
        for uid, entry in scan.added:
            self._entries[uid] = entry
            self._byBase[entry.base] = uid
        self.uidNext = scan.uidNext
        return self._changed(FolderChanges(added=tuple(uid for uid, _ in scan.added)))

    def _saveIndex(self, data: bytes) -> None:
        """Write twistmail-index in a worker, not waited for: the SELECT that listed the
        folder answers meanwhile.  Our own later changes (a flag rename changes an
        entry in place) change cur/ too, so an index that caught one is never trusted."""
        d = self._store._run(_maildirindex.save, self.path, data)
        d.addErrback(lambda f: log.failure("writing the index of {folder}", f, folder=self.name))

    def _applyFull(self, scan: _Scan) -> defer.Deferred:
        validityChanged = bool(self.uidValidity) and scan.uidValidity != self.uidValidity
        old, new = self._entries, scan.entries
        removed = tuple(u for u in old if u not in new)
        expunged = self._expunged(old, removed)  # with the keywords they had
        if scan.keywords != self._keywords:
            self._keywords = scan.keywords
            self._flagCache = {}
        self.uidValidity = scan.uidValidity
        self.uidNext = scan.uidNext
        self._entries = new
        self._byBaseMap = None
        changes = FolderChanges(
            added=tuple(u for u in new if u not in old) if old else tuple(new),
            removed=removed,
            flagsChanged=tuple(u for u, e in new.items() if u in old and old[u].info != e.info)
            if old else (),
            uidValidityChanged=validityChanged,
            expunged=expunged,
        )
        return self._changed(changes)

    # -- our own changes to cur/ -------------------------------------------------

    def _own(self, work, *args):
        """Worker thread: run C{work} and say how cur/ looks after it, if only we changed it.

        @return: (work's result, the new stamps or None if another program had
            changed the folder since our last scan: then the next refresh rescans).
        """
        newDir, curDir = os.path.join(self.path, "new"), os.path.join(self.path, "cur")
        try:
            before = (_stamp(newDir), _stamp(curDir))
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchFolder(self.name) from None  # deleted by another session
        result = work(*args)
        after = (_stamp(newDir), _stamp(curDir)) if before == self._stamps else None
        return result, after

    def _runOwn(self, work, *args) -> defer.Deferred:
        def done(outcome):
            result, stamps = outcome
            self._stamps = stamps
            return result
        return self._store._run(self._whileThere, self._own, work, *args).addCallback(done)

    # -- messages --------------------------------------------------------------

    def _fileName(self, uid: int) -> str:
        entry = self._entries.get(uid)
        if entry is None:
            raise NoSuchMessage(uid)
        return os.path.join(self.path, "cur", f"{entry.base}:2,{entry.info}")

    def openMessage(self, uid: int) -> defer.Deferred:
        try:
            path = self._fileName(uid)
        except NoSuchMessage:
            return defer.fail()
        return self._store._run(self._openSync, path, self._entries[uid].base)

    def readMessages(self, uids) -> defer.Deferred:
        try:
            targets = [(self._fileName(uid), self._entries[uid].base) for uid in uids]
        except NoSuchMessage:
            return defer.fail()
        return self._store._run(self._readSync, targets)

    def _readSync(self, targets: list[tuple[str, str]]) -> list[bytes]:
        out = []
        for path, base in targets:
            with self._openSync(path, base) as f:
                out.append(f.read())
        return out

    def _currentName(self, base: str) -> str | None:
        """The name in cur/ of message C{base} now: another program may have changed its flags."""
        for name in os.listdir(os.path.join(self.path, "cur")):
            if splitName(name)[0] == base:
                return name
        return None

    def _openSync(self, path: str, base: str):
        try:
            return open(path, "rb")
        except FileNotFoundError:
            pass
        # Renamed since the index was made (flags changed by another session or
        # program), or expunged: look for its name now.  It can move, or go, again
        # between the listing and the open (another session's expunge), so a few tries.
        for _ in range(OPEN_TRIES):
            name = self._currentName(base)
            if name is None:
                break
            try:
                return open(os.path.join(self.path, "cur", name), "rb")
            except FileNotFoundError:
                continue
        raise NoSuchMessage(base)

    def _infoFor(self, flags) -> str:
        letters = {_FLAG_LETTERS[f] for f in flags if f in _FLAG_LETTERS}
        if "$Forwarded" in flags:
            letters.add("P")
        for keyword in sorted(f for f in flags if not f.startswith("\\") and f != "$Forwarded"):
            if keyword not in self._keywords:
                if len(self._keywords) >= MAX_KEYWORDS:
                    raise TooManyKeywords(f"at most {MAX_KEYWORDS} keywords per folder")
                self._keywords.append(keyword)
            letters.add(chr(97 + self._keywords.index(keyword)))
        return "".join(sorted(letters))

    def _infosFor(self, flagSets) -> tuple[list[str], list[str] | None]:
        """Info letters for each flag set, giving new keywords letters; all or none.

        @return: (the infos, the keyword list if it grew, else None)
        @raise TooManyKeywords: past MAX_KEYWORDS; the keywords are as before.
        """
        before = list(self._keywords)
        try:
            infos = [self._infoFor(flags) for flags in flagSets]
        except StorageError:
            self._keywords = before
            raise
        if self._keywords == before:
            return infos, None
        self._flagCache = {}
        return infos, list(self._keywords)

    def _setFlags(self, uids: set, flags: frozenset, mode: str) -> defer.Deferred:
        targets = sorted(uids.intersection(self._entries))
        wanted = []
        for uid in targets:
            current = self._flags(self._entries[uid].info)
            wanted.append(flags if mode == "set" else current | flags if mode == "add"
                          else current - flags)
        try:
            infos, keywords = self._infosFor(wanted)
        except StorageError:
            return defer.fail()
        renames = [(uid, self._entries[uid].base, self._entries[uid].info, info)
                   for uid, info in zip(targets, infos, strict=True)
                   if info != self._entries[uid].info]

        def apply(done: list) -> defer.Deferred:
            for uid, info in done:
                self._entries[uid].info = info
            changed = tuple(uid for uid, _ in done)
            d = self._changed(FolderChanges(flagsChanged=changed), own=changed)
            return d.addCallback(lambda ignored: [self._message(u, self._entries[u]) for u in
                                                  sorted(uids.intersection(self._entries))])

        return self._runOwn(self._renameSync, renames, keywords).addCallback(apply)

    def _renameSync(self, renames: list, keywords: list | None) -> list:
        if keywords is not None:
            _uidlist.writeKeywords(self.path, keywords)
        cur = os.path.join(self.path, "cur")
        done = []
        for uid, base, old, new in renames:
            try:
                os.rename(os.path.join(cur, f"{base}:2,{old}"), os.path.join(cur, f"{base}:2,{new}"))
            except FileNotFoundError:
                # Another program changed its flags since our last scan: apply our
                # change on top of theirs instead of dropping it.
                name = self._currentName(base)
                if name is None:
                    continue  # expunged elsewhere; the next refresh reports it
                theirs = splitName(name)[1]
                new = "".join(sorted((set(theirs) | (set(new) - set(old))) - (set(old) - set(new))))
                try:
                    os.rename(os.path.join(cur, name), os.path.join(cur, f"{base}:2,{new}"))
                except FileNotFoundError:
                    continue
            done.append((uid, new))
        return done

    def append(self, source, flags=(), internalDate: float | None = None) -> defer.Deferred:
        def stage(path: str, info: str) -> NewFile:
            return stageMessage(path, _chunks(source), "cur", f":2,{info}", internalDate)

        return self._lock.run(self._add, [(stage, set(flags))]).addCallback(lambda uids: uids[0])

    def importMessages(self, messages) -> defer.Deferred:
        """Appends whose file names keep each message's unique id (POP3 UIDL) when it can be
        a Maildir base name (no '/', ':' or ',') that the folder does not have yet."""
        known = set(self._byBase)
        stages = []
        for source, flags, internalDate, unique in messages:
            name = unique if _USABLE_BASE.fullmatch(unique) and unique not in known else None
            known.add(name)

            def stage(path: str, info: str, source=source, internalDate=internalDate,
                      name=name) -> NewFile:
                base = name or uniqueName()
                tmp = os.path.join(path, "tmp", base)
                size = writeNewFile(tmp, _chunks(source), internalDate)
                return NewFile(tmp, os.path.join(path, "cur", f"{base},S={size}:2,{info}"))

            stages.append((stage, set(flags)))
        return self._lock.run(self._add, stages)

    def copyMessages(self, uids, target: MaildirFolder) -> defer.Deferred:
        """Hard links where the filesystem allows (no bytes copied, as Dovecot does), else copies."""
        try:
            sources = [(uid, self._fileName(uid), self._entries[uid]) for uid in uids]
        except NoSuchMessage:
            return defer.fail()

        def stager(sourcePath: str, entry: _Entry):
            return lambda path, info: _linkOrCopy(self, sourcePath, entry, path, info)

        stages = [(stager(path, entry), self._flags(entry.info)) for _, path, entry in sources]
        d = target._lock.run(target._add, stages)
        return d.addCallback(lambda newUids: list(zip([u for u, _, _ in sources], newUids,
                                                      strict=True)))

    def _add(self, stages: list) -> defer.Deferred:
        """Store new messages in cur/, give them UIDs.

        @param stages: (stage, flags) pairs; C{stage(folderPath, info)} writes a
            message under tmp/ and returns the L{NewFile} to commit.
        @return: Deferred firing with the new UIDs, in order.
        """
        try:
            infos, keywords = self._infosFor([flags for _, flags in stages])
        except StorageError:
            return defer.fail()
        work = [(stage, info) for (stage, _), info in zip(stages, infos, strict=True)]
        d = self._runOwn(self._addSync, work, keywords)

        def added(result: tuple) -> defer.Deferred:
            entries, uidNext = result
            for uid, entry in entries:
                self._entries[uid] = entry
                self._byBase[entry.base] = uid
            self.uidNext = uidNext
            d = self._changed(FolderChanges(added=tuple(uid for uid, _ in entries)))
            return d.addCallback(lambda ignored: [uid for uid, _ in entries])

        return d.addCallback(added)

    def _addSync(self, work: list, keywords) -> tuple:
        if not os.path.isdir(os.path.join(self.path, "cur")):
            raise NoSuchFolder(self.name)
        if keywords is not None:
            _uidlist.writeKeywords(self.path, keywords)
        results = commitBatch([lambda stage=stage, info=info: [stage(self.path, info)]
                               for stage, info in work])
        failed = [r for r in results if isinstance(r, Exception)]
        entries, appended, uid = [], [], self.uidNext
        for result in results:
            if isinstance(result, Exception):
                continue
            base, info = splitName(os.path.basename(result[0]))
            st = os.stat(result[0])
            size = _sizeFromBase(base) or st.st_size
            entries.append((uid, _Entry((base, info, size, int(st.st_mtime)))))
            appended.append((uid, int(st.st_mtime), size, base))
            uid += 1
        if failed:
            # All or nothing, so a COPY either happened or did not (RFC 3501 §6.4.7).
            for entry in entries:
                _unlinkQuietly(os.path.join(self.path, "cur", f"{entry[1].base}:2,{entry[1].info}"))
            raise failed[0]
        _uidlist.append(os.path.join(self.path, _uidlist.UIDLIST), appended)
        return entries, uid

    def remove(self, uids) -> defer.Deferred:
        return self._lock.run(self._remove, set(uids))

    def _remove(self, uids: set) -> defer.Deferred:
        targets = {uid: self._fileName(uid) for uid in sorted(uids.intersection(self._entries))}
        if not targets:
            return defer.succeed([])
        keep = [(u, e.internalDate, e.size, e.base) for u, e in self._entries.items()
                if u not in targets]

        def removed(ignored) -> defer.Deferred:
            expunged = self._expunged(self._entries, targets)
            for uid in targets:
                del self._byBase[self._entries.pop(uid).base]
            d = self._changed(FolderChanges(removed=tuple(targets), expunged=expunged))
            return d.addCallback(lambda ignored: list(targets))

        return self._runOwn(self._removeSync, targets, keep).addCallback(removed)

    def _removeSync(self, targets: dict, keep: list) -> None:
        for path in targets.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                # Its flags were changed by another program: it is still there under
                # another name, and would come back with a new UID if left.
                name = self._currentName(splitName(os.path.basename(path))[0])
                if name is not None:
                    try:
                        os.unlink(os.path.join(self.path, "cur", name))
                    except FileNotFoundError:
                        pass
        _fsutil.fsyncDir(os.path.join(self.path, "cur"))
        # Rewrite, keeping N: UIDs of removed messages are never handed out again.
        _uidlist.write(os.path.join(self.path, _uidlist.UIDLIST), self.uidValidity, self.uidNext,
                       keep)


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _linkOrCopy(folder: MaildirFolder, sourcePath: str, entry: _Entry, targetPath: str,
                info: str) -> NewFile:
    """Stage a copy of a message in C{targetPath}/tmp: a hard link if possible."""
    name = uniqueName()
    tmp = os.path.join(targetPath, "tmp", name)
    final = os.path.join(targetPath, "cur", f"{name},S={entry.size}:2,{info}")
    try:
        os.link(sourcePath, tmp)  # the same inode: INTERNALDATE (its mtime) comes along
        return NewFile(tmp, final)
    except FileNotFoundError:
        with folder._openSync(sourcePath, entry.base) as f:
            data = f.read()
    except OSError:
        with open(sourcePath, "rb") as f:
            data = f.read()
    writeNewFile(tmp, [data], entry.internalDate)
    return NewFile(tmp, final)
