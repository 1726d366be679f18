# -*- test-case-name: tests.test_mbox -*-
"""mbox backend: each folder one mbox file, shared safely with mutt, procmail and Dovecot.

Layout of one account (``<data_dir>/mbox/<domain>/<local>/``)::

    INBOX                  an mbox file (mboxrd, see L{twistmail.storage._mboxformat})
    Sent  Work             folders: one file each
    Work.sbd/Clients       children of Work (Thunderbird's convention, so a folder
    INBOX.sbd/Lists          can hold messages and have children, as IMAP wants)
    .INBOX.index           per folder: UIDs, offsets, flags (L{twistmail.storage._mboxindex})
    INBOX.lock             dot-lock, only while a program writes (L{twistmail.storage._locking})
    .subscriptions         per account
    .uidvalidity           per account: the last UIDVALIDITY handed out

Folder name components are escaped with L{folders.escapeComponent}, which
leaves no '.', '/' or '%': a folder's file name never contains a dot, and
every name with a dot is ours, so no folder name can reach another folder's
index, a lock, a ``.sbd`` directory or anything outside the account.

It lives beside the Maildir tree (``<data_dir>/mail``), not in it, so
``twistmail migrate`` can build one while the other stays untouched.
"""

from __future__ import annotations

import os
import shutil
import time

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistmail import _fsutil
from twistmail.errors import FolderExists, InvalidFolderName, NoSuchFolder, StorageError
from twistmail.interfaces import IMailAccount, IMailStore, IMailStoreFactory
from twistmail.storage import _mboxindex, folders
from twistmail.storage._filestore import FileAccount, FileStore
from twistmail.storage._locking import MailboxLock
from twistmail.storage._mboxio import Outgoing, uniqueId, writeMessages
from twistmail.storage.mboxfolder import MboxFolder, modseqPath

log = Logger()

SUBSCRIPTIONS = ".subscriptions"
NAME_MAX = 255
#: Octets a component's derived names add (".<name>.index.tmp.<pid>.<n>", ".<name>.lk<pid>.<n>",
#: ".<name>.rewrite").
_DERIVED = 40
#: Deliveries written to one mbox in one locked trip (one fsync).
MAX_BATCH = 64


def _component(part: str) -> str:
    escaped = folders.escapeComponent(part)
    if len(os.fsencode(escaped)) > NAME_MAX - _DERIVED:
        raise InvalidFolderName(f"folder name component too long for this server (at most "
                                f"{NAME_MAX - _DERIVED} octets once escaped)")
    return escaped


@implementer(IMailAccount)
class MboxAccount(FileAccount):
    subscriptionsFile = SUBSCRIPTIONS

    def _prepareInbox(self, path: str) -> None:
        self._ensureFile(path)

    def _makeRoot(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def folderPath(self, name: str) -> str:
        """The mbox file of folder C{name}; raises InvalidFolderName."""
        parts = [_component(p) for p in folders.normalize(name).split(folders.SEPARATOR)]
        return os.path.join(self.root, *(p + ".sbd" for p in parts[:-1]), parts[-1])

    def _ensureFile(self, path: str) -> bool:
        """Create the (empty) mbox file C{path} and its directories; True if it was new."""
        directory = os.path.dirname(path)
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
        for created in [directory] + [os.path.dirname(m) for m in missing]:
            _fsutil.fsyncDir(created)
        return True

    def _ensureParents(self, name: str, path: str) -> None:
        parts = name.split(folders.SEPARATOR)
        for depth in range(1, len(parts)):
            self._ensureFile(self.folderPath(folders.SEPARATOR.join(parts[:depth])))
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)

    def listFolders(self) -> defer.Deferred:
        return self._store._run(self._listSync)

    def _listSync(self) -> list[str]:
        names = {"INBOX"}

        def walk(directory: str, prefix: str) -> None:
            try:
                entries = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                return
            for entry in entries:
                path = os.path.join(directory, entry)
                if "." not in entry:
                    if os.path.isfile(path):
                        names.add(prefix + folders.unescapeComponent(entry))
                elif entry.endswith(".sbd") and "." not in entry[:-4] and os.path.isdir(path):
                    walk(path, prefix + folders.unescapeComponent(entry[:-4]) + folders.SEPARATOR)

        walk(self.root, "")
        return sorted(names, key=lambda n: (n != "INBOX", n))

    def createFolder(self, name: str) -> defer.Deferred:
        if isinstance(name, str) and folders.isInbox(name):
            return defer.fail(FolderExists("INBOX"))
        try:
            name = folders.normalize(name)
            self.folderPath(name)
        except InvalidFolderName:
            return defer.fail()
        return self._changeTree(self._createSync, name)

    def _createSync(self, name: str) -> None:
        parts = name.split(folders.SEPARATOR)
        if os.path.isfile(self.folderPath(name)):
            raise FolderExists(name)
        for depth in range(1, len(parts) + 1):  # parents are folders too
            self._ensureFile(self.folderPath(folders.SEPARATOR.join(parts[:depth])))

    def deleteFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
            path = self.folderPath(name)
        except InvalidFolderName:
            return defer.fail()
        if name == "INBOX":
            return defer.fail(StorageError("INBOX cannot be deleted"))
        return self._changeTree(self._deleteSync, name, path).addCallback(
            lambda ignored: self._store._forget(self.name, name))

    def _deleteSync(self, name: str, path: str) -> None:
        if not os.path.isfile(path):
            raise NoSuchFolder(name)
        # Under the write lock, so no program is halfway through a write; children
        # (the .sbd directory) stay, as Maildir++ keeps .Work.Clients when .Work goes.
        with self._store._mailboxLock(path, exclusive=True):
            os.unlink(path)
            _unlinkQuietly(_indexPath(path))
            _unlinkQuietly(modseqPath(path))
            _fsutil.fsyncDir(os.path.dirname(path))

    def renameFolder(self, old: str, new: str) -> defer.Deferred:
        try:
            old, new = folders.normalize(old), folders.normalize(new)
            src, dst = self.folderPath(old), self.folderPath(new)
        except InvalidFolderName:
            return defer.fail()
        if new == "INBOX":
            return defer.fail(FolderExists(new))
        if new.startswith(old + folders.SEPARATOR):
            return defer.fail(InvalidFolderName("a folder cannot move into its own child"))
        if old != "INBOX":
            return self._changeTree(self._renameSync, old, new, src, dst).addCallback(
                lambda ignored: self._store._forget(self.name, old))
        # INBOX stays empty with the same UIDVALIDITY, and its UIDNEXT goes on.
        return self._renameInbox(self._renameInboxSync, new, src, dst)

    def _renameSync(self, old: str, new: str, src: str, dst: str) -> None:
        if not os.path.isfile(src):
            raise NoSuchFolder(old)
        if os.path.exists(dst):
            raise FolderExists(new)
        self._ensureParents(new, dst)
        with self._store._mailboxLock(src, exclusive=True):
            os.rename(src, dst)
            if os.path.isdir(src + ".sbd"):  # the children move along
                os.rename(src + ".sbd", dst + ".sbd")
            for sidecar in (_indexPath, modseqPath):
                if os.path.exists(sidecar(src)):
                    os.rename(sidecar(src), sidecar(dst))
            for directory in {os.path.dirname(src), os.path.dirname(dst)}:
                _fsutil.fsyncDir(directory)

    def _renameInboxSync(self, new: str, src: str, dst: str) -> None:
        self._ensureFile(src)
        if os.path.exists(dst):
            raise FolderExists(new)
        self._ensureParents(new, dst)
        with self._store._mailboxLock(src, exclusive=True) as lock:
            # Bring the index up to date first: it moves with the messages.
            sync = MboxFolder(self._store, self.name, "INBOX", src, self.root)._reconcile(lock.fd)
            os.rename(src, dst)
            os.rename(_indexPath(src), _indexPath(dst))
            if os.path.exists(modseqPath(src)):
                # A copy: INBOX keeps its UIDVALIDITY, so its modseqs must go on, not restart.
                shutil.copyfile(modseqPath(src), modseqPath(dst))
            self._ensureFile(src)
            _mboxindex.write(_indexPath(src), sync.uidValidity, sync.uidNext, {}, [],
                             _mboxindex.stampOf(os.stat(src)))
            _fsutil.fsyncDir(os.path.dirname(dst))


def _indexPath(path: str) -> str:
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.index")


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@implementer(IMailStore)
class MboxStore(FileStore):
    """All accounts' mbox folders under ``<data_dir>/mbox``."""

    tree = "mbox"
    accountClass = MboxAccount
    folderClass = MboxFolder
    # The directory, not the file: a rewrite replaces the file.
    watchMask = ("IN_MODIFY", "IN_MOVED_TO", "IN_CREATE", "IN_DELETE", "IN_CLOSE_WRITE")

    def __init__(self, dataDir: str, dotlock: bool = True, lockTimeout: float = 30.0,
                 deferToThread=threads.deferToThread, reactor=None) -> None:
        super().__init__(dataDir, deferToThread, reactor)
        self.dotlock = dotlock
        self.lockTimeout = lockTimeout
        self._pending: dict[str, list] = {}  # mbox path -> deliveries waiting for it

    def _mailboxLock(self, path: str, exclusive: bool) -> MailboxLock:
        return MailboxLock(path, exclusive, self.dotlock, self.lockTimeout)

    # -- delivery -------------------------------------------------------------------

    def deliver(self, account: str, folder: str, source, flags=()) -> defer.Deferred:
        """Append under the lock and fsync, O(message); concurrent deliveries to one
        mbox share one lock and one fsync."""
        try:
            acct = self.account(account)
            name = folders.normalize(folder)
            path = acct.folderPath(name)
        except StorageError:
            return defer.fail()
        d = defer.Deferred()
        out = Outgoing(source.chunks, frozenset(flags), time.time(), uniqueId(), new=True)
        queue = self._pending.setdefault(path, [])
        queue.append((out, d))
        if len(queue) == 1:
            self._deliverNext(acct, path)

        def delivered(unique: str) -> str:
            self._refreshIfListened(acct.name, name)
            return unique

        return d.addCallback(delivered)

    def _deliverNext(self, account: MboxAccount, path: str) -> None:
        batch = self._pending[path][:MAX_BATCH]
        d = self._run(self._deliverSync, account, path, [out for out, _ in batch])
        d.addBoth(self._delivered, account, path, batch)

    def _delivered(self, result, account: MboxAccount, path: str, batch: list) -> None:
        del self._pending[path][:len(batch)]
        if self._pending[path]:
            self._deliverNext(account, path)
        else:
            del self._pending[path]
        for out, d in batch:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(out.uniqueId)

    def _deliverSync(self, account: MboxAccount, path: str, outs: list) -> list:
        try:
            account._ensureFile(path)
            with self._mailboxLock(path, exclusive=True) as lock:
                return writeMessages(lock.fd, outs)
        except OSError as e:
            raise StorageError(f"cannot deliver to {path}: {e.strerror}") from e

    def removeAccount(self, name: str) -> defer.Deferred:
        return self._run(shutil.rmtree, self.accountPath(name), True)


@implementer(IMailStoreFactory)
class MboxStoreFactory:
    name = "mbox"
    description = "one mbox file per folder, shared with mutt, procmail and Dovecot"

    def makeStore(self, options: dict, dataDir: str) -> MboxStore:
        from twistmail.config import ConfigError

        options = dict(options)
        dotlock = options.pop("dotlock", True)
        timeout = options.pop("lock_timeout", 30)
        if options:
            raise ConfigError(f"[storage.mbox] {', '.join(sorted(options))}: unknown option. "
                              "Fix: use dotlock or lock_timeout")
        if not isinstance(dotlock, bool):
            raise ConfigError(f"[storage.mbox] dotlock: expected true or false, got {dotlock!r}. "
                              "Fix: write dotlock = true")
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
            raise ConfigError(f"[storage.mbox] lock_timeout: expected whole seconds >= 1, got "
                              f"{timeout!r}. Fix: write e.g. lock_timeout = 30")
        return MboxStore(dataDir, dotlock=dotlock, lockTimeout=float(timeout))
