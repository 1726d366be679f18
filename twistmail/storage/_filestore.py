"""What the file backends (Maildir, mbox) share, so each module holds only its format.

* L{FileStore}: account paths under ``<data_dir>/<tree>``, and the folder
  cache: every folder a session has open (weakly), plus the C{KEEP_FOLDERS}
  most recently used, so reopening a big folder costs a stat() or two
  instead of rereading its index.
* L{FileAccount}: subscriptions and opening folders.
* L{FolderIndex}: a folder's in-memory snapshot and its listeners.
* L{Watcher}: refreshes folders that have listeners when another program
  changes them, by inotify (one watch per directory, shared) or a poll.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref

from twisted.internet import defer, task, threads
from twisted.logger import Logger

from twistmail import _fsutil
from twistmail.auth.accounts import AccountError, validAddress
from twistmail.errors import InvalidFolderName, NoSuchFolder, StorageError
from twistmail.model import FolderChanges, StoredMessage
from twistmail.storage import flagColumnOf, folders
from twistmail.storage._modseq import ModSeqs

log = Logger()

#: Folders kept indexed in memory after their last session closed.
KEEP_FOLDERS = 16
POLL_INTERVAL = 1.0


class FileStore:
    """Subclasses set C{tree} (the directory under the data directory), C{accountClass},
    C{folderClass} and C{watchMask} (the inotify event names that mean a change)."""

    tree: str
    accountClass: type
    folderClass: type
    watchMask: tuple[str, ...]

    def __init__(self, dataDir: str, deferToThread=threads.deferToThread, reactor=None) -> None:
        self.root = os.path.join(dataDir, self.tree)
        self._run = deferToThread
        self._folders: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._recentlyUsed: collections.OrderedDict = collections.OrderedDict()
        self._reactor = reactor
        self._watcher: Watcher | None = None
        # Held by every change to an account's folder tree and subscriptions (worker
        # threads): each is check-then-act on shared files (a client's parallel first
        # logins all subscribe; two sessions delete or rename one folder at once), so
        # none may interleave with another.  One lock for the store, not one per
        # account (no table to bound): such changes are rare.  Reentrant: renaming
        # INBOX creates the target folder.
        self._treeLock = threading.RLock()

    def accountPath(self, name: str) -> str:
        try:
            canonical = validAddress(name)
        except AccountError as e:
            raise StorageError(str(e)) from None
        local, domain = canonical.split("@")
        return os.path.join(self.root, domain, local)

    def account(self, name: str):
        return self.accountClass(self, name.lower(), self.accountPath(name))

    def _folder(self, account: FileAccount, name: str, path: str):
        key = (account.name, name)
        folder = self._folders.get(key)
        if folder is None:
            folder = self._folders[key] = self.folderClass(self, account.name, name, path,
                                                           account.root)
        self._recentlyUsed[key] = folder
        self._recentlyUsed.move_to_end(key)
        while len(self._recentlyUsed) > KEEP_FOLDERS:
            self._recentlyUsed.popitem(last=False)
        return folder

    def _forget(self, account: str, name: str) -> None:
        """Drop the cached index of C{name} and its children (deleted or renamed)."""
        for cache in (self._folders, self._recentlyUsed):
            for key in [k for k in list(cache.keys())
                        if k[0] == account and (k[1] == name or k[1].startswith(name + "/"))]:
                cache.pop(key, None)

    def _refreshIfListened(self, account: str, name: str) -> None:
        """After a delivery: sessions in IDLE hear of it now, not at the next poll."""
        folder = self._folders.get((account, name))
        if folder is not None and folder.hasListeners():
            folder.refresh().addErrback(lambda f: log.failure("refresh after delivery", f))

    def _watch(self, folder: FolderIndex) -> FolderWatch:
        """Start noticing other programs' changes to C{folder} (it has listeners now)."""
        if self._watcher is None:
            if self._reactor is None:
                from twisted.internet import reactor

                self._reactor = reactor
            self._watcher = Watcher(self._reactor, self.watchMask)
        return FolderWatch(self._watcher, folder, folder.watchTargets())


class FileAccount:
    """Subclasses set C{subscriptionsFile} and implement C{folderPath},
    C{_prepareInbox(path)} (make INBOX exist) and C{_makeRoot()}."""

    subscriptionsFile: str

    def __init__(self, store: FileStore, name: str, root: str) -> None:
        self._store = store
        self.name = name
        self.root = root

    def folderPath(self, name: str) -> str:
        raise NotImplementedError

    def _prepareInbox(self, path: str) -> None:
        raise NotImplementedError

    def _makeRoot(self) -> None:
        raise NotImplementedError

    def openFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
            path = self.folderPath(name)
        except InvalidFolderName:
            return defer.fail()
        folder = self._store._folder(self, name, path)
        d = self._store._run(self._prepareInbox, path) if name == "INBOX" else defer.succeed(None)
        return d.addCallback(lambda ignored: folder.refresh()).addCallback(lambda ignored: folder)

    def _changeTree(self, work, *args) -> defer.Deferred:
        """Run C{work} in a worker thread under the store's tree lock."""
        return self._store._run(self._underTreeLock, work, *args)

    def _underTreeLock(self, work, *args):
        with self._store._treeLock:
            return work(*args)

    def _renameInbox(self, work, *args) -> defer.Deferred:
        """Run C{work} (INBOX's messages move, INBOX stays: RFC 3501 §6.3.5) like
        L{_changeTree}, also under INBOX's folder lock if a session has it open.  INBOX
        stays in the folder cache: its sessions keep sharing one index."""
        inbox = self._store._folders.get((self.name, "INBOX"))

        def run() -> defer.Deferred:
            return self._changeTree(work, *args)

        return inbox._lock.run(run) if inbox is not None else run()

    def subscriptions(self) -> defer.Deferred:
        return self._store._run(self._readSubscriptions)

    def _readSubscriptions(self) -> list[str]:
        try:
            with open(os.path.join(self.root, self.subscriptionsFile), encoding="utf-8") as f:
                return sorted(line for line in f.read().split("\n") if line)
        except FileNotFoundError:
            return []

    def setSubscribed(self, name: str, subscribed: bool) -> defer.Deferred:
        try:
            name = folders.normalize(name)
        except InvalidFolderName:
            return defer.fail()
        return self._changeTree(self._setSubscribedSync, name, subscribed)

    def _setSubscribedSync(self, name: str, subscribed: bool) -> None:
        current = set(self._readSubscriptions())
        current = current | {name} if subscribed else current - {name}
        self._makeRoot()
        _fsutil.atomicWrite(os.path.join(self.root, self.subscriptionsFile),
                            "".join(n + "\n" for n in sorted(current)).encode("utf-8"))


class FolderIndex:
    """The part of a folder every session sees: snapshot, UIDs, keywords, listeners.

    Subclasses keep C{_entries} (uid -> entry, ascending) and C{_keywords}, implement
    C{_message(uid, entry)}, C{refresh()}, C{watchTargets()} and C{_setFlags} (setFlags
    without taking the folder lock), set C{modseqPath}, and call (and wait for)
    C{_changed} after changing the index (on the reactor thread, folder lock held).

    RFC 7162 mod-sequences are L{ModSeqs}, journaled beside the backend's index:
    C{_changed} gives each change its modseq before the listeners hear of it."""

    modseqPath: str

    def __init__(self, store: FileStore, account: str, name: str, path: str,
                 accountRoot: str) -> None:
        self._store = store
        self.account = account
        self.name = name
        self.path = path
        self._accountRoot = accountRoot
        self.uidValidity = 0
        self.uidNext = 1
        self._entries: dict = {}
        self._keywords: list[str] = []
        self._snapshot: list | None = None
        self._uids: tuple | None = None
        self._column: list | None = None
        self._listeners: list = []
        self._lock = defer.DeferredLock()
        self._watch: FolderWatch | None = None
        self._modseqs = ModSeqs(self.modseqPath)

    def _message(self, uid: int, entry) -> StoredMessage:
        raise NotImplementedError

    def refresh(self) -> defer.Deferred:
        raise NotImplementedError

    def watchTargets(self) -> list[tuple[str, str | None]]:
        """(directory, file name or None for any) pairs whose changes mean a refresh."""
        raise NotImplementedError

    def messages(self) -> list:
        if self._snapshot is None:
            self._snapshot = [self._message(uid, e) for uid, e in self._entries.items()]
        return self._snapshot

    def flagColumn(self) -> list:
        if self._column is None:
            self._column = self._buildFlagColumn()
        return self._column

    def _buildFlagColumn(self) -> list:
        return flagColumnOf(self.messages())

    def uids(self) -> tuple:
        if self._uids is None:
            self._uids = tuple(self._entries)
        return self._uids

    def message(self, uid: int) -> StoredMessage | None:
        entry = self._entries.get(uid)
        return None if entry is None else self._message(uid, entry)

    def keywords(self) -> list[str]:
        return list(self._keywords)

    def _expunged(self, entries: dict, uids) -> tuple:
        """The messages C{uids} of C{entries} as they were, for L{FolderChanges.expunged}."""
        return tuple(self._message(uid, entries[uid]) for uid in uids)

    # -- RFC 7162 mod-sequences (IModSeqMailbox) ---------------------------------------

    @property
    def highestModSeq(self) -> int:
        return self._modseqs.highest

    def changedSince(self, modseq: int) -> list[int]:
        return self._modseqs.changedSince(modseq)

    def vanishedSince(self, modseq: int) -> list[int] | None:
        return self._modseqs.vanishedSince(modseq)

    def setFlags(self, uids, flags, mode: str) -> defer.Deferred:
        return self._lock.run(self._setFlags, set(uids), frozenset(flags), mode)

    def setFlagsUnchangedSince(self, uids, flags, mode: str, modseq: int) -> defer.Deferred:
        def conditional() -> defer.Deferred:
            # Under the folder lock: no other change can come between check and store.
            modified = sorted(u for u in set(uids) if self._modseqs.of(u) > modseq)
            allowed = set(uids).difference(modified)
            d = self._setFlags(allowed, frozenset(flags), mode) if allowed else defer.succeed([])
            return d.addCallback(lambda updated: (updated, modified))

        return self._lock.run(conditional)

    def _setFlags(self, uids: set, flags: frozenset, mode: str) -> defer.Deferred:
        raise NotImplementedError

    def _changed(self, changes: FolderChanges, own=()) -> defer.Deferred:
        """Give C{changes} their modseqs (a worker trip to the journal), then tell the listeners.

        @param own: the uids of C{changes.flagsChanged} this process changed itself
            (setFlags), as opposed to found changed by a refresh.
        @return: Deferred firing with C{changes}: wait for it before releasing the lock.
        """
        if not changes and self._modseqs.inode:
            return defer.succeed(changes)
        self._snapshot = None
        self._uids = None
        self._column = None
        modseqs = self._modseqs
        d = self._store._run(modseqs.record, self.uidValidity, changes.added,
                             changes.flagsChanged, changes.removed, self.uidNext, frozenset(own))
        d.addCallback(modseqs.apply)
        d.addErrback(self._modseqsFailed)
        d.addCallback(lambda ignored: self._compactModSeqs())
        return d.addCallback(lambda ignored: self._notify(changes))

    def _modseqsFailed(self, failure) -> None:
        # Deleted or renamed by another session meanwhile: its journal went with it.
        if not failure.check(FileNotFoundError, NotADirectoryError):
            log.failure("recording the modseqs of {folder}", failure, folder=self.name)

    def _compactModSeqs(self) -> defer.Deferred | None:
        modseqs = self._modseqs
        if not modseqs.needsCompaction():
            return None
        snapshot = [(m, u) for u, m in modseqs.byUid.items()]
        d = self._store._run(modseqs.compact, snapshot, list(modseqs.tombstones))
        d.addCallback(lambda delta: None if delta is None else modseqs.apply(delta))
        return d.addErrback(self._modseqsFailed)

    def _notify(self, changes: FolderChanges) -> FolderChanges:
        if changes:
            self._snapshot = None  # its messages carry the old modseqs
            for listener in list(self._listeners):
                try:
                    listener(changes)
                except Exception:
                    log.failure("folder listener failed for {folder}", folder=self.name)
        return changes

    def addListener(self, listener) -> None:
        self._listeners.append(listener)
        if self._watch is None:
            self._watch = self._store._watch(self)

    def removeListener(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners and self._watch is not None:
            self._watch.stop()
            self._watch = None

    def hasListeners(self) -> bool:
        return bool(self._listeners)


class Watcher:
    """One inotify instance per store; one kernel watch per directory, shared by every
    folder watching something in it (mbox folders are files side by side).  Where
    there is no inotify, each FolderWatch polls instead."""

    def __init__(self, reactor, maskNames: tuple[str, ...]) -> None:
        self._reactor = reactor
        self._notifier = None
        self._dirs: dict[str, dict[bytes | None, set]] = {}
        self._paths: dict[str, object] = {}
        try:
            from twisted.internet import inotify

            self._notifier = inotify.INotify(reactor)
            self._notifier.startReading()
            self._mask = 0
            for name in maskNames:
                self._mask |= getattr(inotify, name)
        except Exception:
            self._notifier = None

    def _add(self, watch: FolderWatch, directory: str, name: str | None) -> bool:
        names = self._dirs.get(directory)
        if names is None:
            from twisted.python.filepath import FilePath

            path = FilePath(os.fsencode(directory))
            try:
                self._notifier.watch(path, self._mask, callbacks=[self._event])
            except Exception:
                return False
            names = self._dirs[directory] = {}
            self._paths[directory] = path
        names.setdefault(None if name is None else os.fsencode(name), set()).add(watch)
        return True

    def _remove(self, watch: FolderWatch, directory: str, name: str | None) -> None:
        names = self._dirs.get(directory)
        if names is None:
            return
        key = None if name is None else os.fsencode(name)
        names.get(key, set()).discard(watch)
        if not names.get(key, True):
            del names[key]
        if not names:
            del self._dirs[directory]
            try:
                self._notifier.ignore(self._paths.pop(directory))
            except KeyError:
                pass  # the kernel dropped the watch when another session deleted the folder

    def _event(self, ignored, path, mask) -> None:
        names = self._dirs.get(os.fsdecode(path.dirname()), {})
        for watch in list(names.get(path.basename(), ())) + list(names.get(None, ())):
            watch.changed()


class FolderWatch:
    def __init__(self, watcher: Watcher, folder: FolderIndex,
                 targets: list[tuple[str, str | None]]) -> None:
        self._watcher = watcher
        self.folder = folder
        self._pending = None
        self._loop = None
        self._targets: list[tuple[str, str | None]] = []
        if watcher._notifier is not None:
            for target in targets:
                if not watcher._add(self, *target):
                    break
                self._targets.append(target)
        if len(self._targets) < len(targets):
            self._unwatch()
            self._loop = task.LoopingCall(self._refresh)
            self._loop.clock = watcher._reactor
            self._loop.start(POLL_INTERVAL, now=False)

    def changed(self) -> None:
        if self._pending is None:
            # Coalesce a burst of events (a big append is many writes) into one refresh.
            self._pending = self._watcher._reactor.callLater(0.05, self._refresh)

    def _refresh(self) -> None:
        self._pending = None
        self.folder.refresh().addErrback(self._failed)

    def _failed(self, failure) -> None:
        if not failure.check(NoSuchFolder):
            log.failure("refreshing {folder}", failure, folder=self.folder.name)

    def _unwatch(self) -> None:
        for target in self._targets:
            self._watcher._remove(self, *target)
        self._targets = []

    def stop(self) -> None:
        self._unwatch()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
