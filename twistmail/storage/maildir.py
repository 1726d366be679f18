# -*- test-case-name: tests.test_store_conformance -*-
"""Maildir backend (https://cr.yp.to/proto/maildir.html) with Maildir++ folders.

Layout of one account (``<data_dir>/mail/<domain>/<local>/``)::

    cur/ new/ tmp/           INBOX
    .Sent/ .Work.Clients/    folders (Maildir++; '/' in IMAP names becomes '.')
    twistmail-uidlist        per folder: UIDVALIDITY, next UID, uid -> file base
    twistmail-keywords       per folder: keyword letters a-z (Dovecot's scheme)
    twistmail-subscriptions  per account
    twistmail-uidvalidity    per account: the last UIDVALIDITY handed out

Delivery (SMTP) writes ``tmp/<unique>``, syncs it, renames it to
``new/<unique>,S=<size>`` and syncs ``new/`` — only then does SMTP say 250.
A crash before the rename leaves only a tmp/ file, which no reader lists.
Concurrent deliveries share their syncs (``twistmail._groupcommit``).
UIDs are assigned lazily when a folder is opened or refreshed, as Dovecot does,
so delivery never contends with readers for the uidlist.  The folder index is
L{twistmail.storage.maildirfolder}.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from twistmail import _fsutil
from twistmail._groupcommit import GroupCommit, NewFile
from twistmail.errors import FolderExists, InvalidFolderName, NoSuchFolder, StorageError
from twistmail.interfaces import IMailAccount, IMailStore, IMailStoreFactory
from twistmail.storage import folders
from twistmail.storage._filestore import FileAccount, FileStore
from twistmail.storage.maildirfolder import (
    MaildirFolder,
    makeMaildir,
    stageMessage,
    uniqueName,
)

log = Logger()

SUBSCRIPTIONS = "twistmail-subscriptions"
NAME_MAX = 255  # octets in one directory entry (Linux, BSD, macOS)


def _checkDirname(dirname: str) -> None:
    # A Maildir++ folder is one directory entry: escaped components joined by '.'.
    if len(os.fsencode(dirname)) > NAME_MAX:
        raise InvalidFolderName(f"folder name too long for this server (at most {NAME_MAX} "
                                "octets once escaped, all levels together)")


@implementer(IMailAccount)
class MaildirAccount(FileAccount):
    subscriptionsFile = SUBSCRIPTIONS

    def _prepareInbox(self, path: str) -> None:
        makeMaildir(self.root)

    def _makeRoot(self) -> None:
        makeMaildir(self.root)

    def folderPath(self, name: str) -> str:
        name = folders.normalize(name)
        if name == "INBOX":
            return self.root
        dirname = "." + ".".join(folders.escapeComponent(p) for p in name.split(folders.SEPARATOR))
        _checkDirname(dirname)
        return os.path.join(self.root, dirname)

    def _nameFromDir(self, dirname: str) -> str:
        return folders.SEPARATOR.join(folders.unescapeComponent(p) for p in dirname[1:].split("."))

    def listFolders(self) -> defer.Deferred:
        return self._store._run(self._listSync)

    def _listSync(self) -> list[str]:
        names = ["INBOX"]
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return names
        for entry in entries:
            if entry.startswith(".") and not entry.startswith("..") and \
                    os.path.isdir(os.path.join(self.root, entry, "cur")):
                names.append(self._nameFromDir(entry))
        return sorted(names, key=lambda n: (n != "INBOX", n))

    def createFolder(self, name: str) -> defer.Deferred:
        if isinstance(name, str) and folders.isInbox(name):
            return defer.fail(FolderExists("INBOX"))  # it always exists
        return defer.maybeDeferred(self.folderPath, name).addCallback(
            lambda path: self._changeTree(self._createSync, folders.normalize(name), path))

    def _createSync(self, name: str, path: str) -> None:
        if os.path.isdir(os.path.join(path, "cur")):
            raise FolderExists(name)
        makeMaildir(self.root)
        parts = name.split(folders.SEPARATOR)
        for depth in range(1, len(parts) + 1):  # Maildir++ has no implicit parents
            folderPath = self.folderPath(folders.SEPARATOR.join(parts[:depth]))
            if folderPath == self.root:
                continue  # INBOX/...: the account's Maildir is not a Maildir++ folder
            makeMaildir(folderPath)
            with open(os.path.join(folderPath, "maildirfolder"), "a"):
                pass
        _fsutil.fsyncDir(self.root)

    def deleteFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
            path = self.folderPath(name)
        except InvalidFolderName:
            return defer.fail()
        if name == "INBOX":
            return defer.fail(StorageError("INBOX cannot be deleted"))
        # The folder cache is the reactor thread's: forget there, not in the worker.
        return self._changeTree(self._deleteSync, name, path).addCallback(
            lambda ignored: self._store._forget(self.name, name))

    def _deleteSync(self, name: str, path: str) -> None:
        if not os.path.isdir(os.path.join(path, "cur")):
            raise NoSuchFolder(name)
        # Rename away first so no reader sees a half-deleted folder.
        trash = os.path.join(self.root, f"..deleting-{uniqueName()}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            raise NoSuchFolder(name) from None  # another program deleted it just now
        _fsutil.fsyncDir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def renameFolder(self, old: str, new: str) -> defer.Deferred:
        try:
            old, new = folders.normalize(old), folders.normalize(new)
        except InvalidFolderName:
            return defer.fail()
        if old != "INBOX":
            return self._changeTree(self._renameSync, old, new).addCallback(
                lambda ignored: self._store._forget(self.name, old))
        return self._renameInbox(self._renameSync, old, new)

    def _renameSync(self, old: str, new: str) -> None:
        src, dst = self.folderPath(old), self.folderPath(new)
        if old == "INBOX":
            makeMaildir(self.root)  # INBOX always exists, even before the first delivery
        if new == "INBOX":
            raise FolderExists(new)
        if not os.path.isdir(os.path.join(src, "cur")):
            raise NoSuchFolder(old)
        if os.path.isdir(os.path.join(dst, "cur")):
            raise FolderExists(new)
        if old == "INBOX":
            # RFC 3501 §6.3.5: move INBOX's messages into the new folder, leave INBOX empty.
            self._createSync(new, dst)
            for sub in ("cur", "new"):
                for name in os.listdir(os.path.join(src, sub)):
                    os.rename(os.path.join(src, sub, name), os.path.join(dst, sub, name))
            for path in (os.path.join(src, "cur"), os.path.join(src, "new"), os.path.join(dst, "cur"),
                         os.path.join(dst, "new")):
                _fsutil.fsyncDir(path)
            return
        prefix = os.path.basename(src)
        moves = [(entry, os.path.basename(dst) + entry[len(prefix):])
                 for entry in os.listdir(self.root)  # the folder and its children
                 if entry == prefix or entry.startswith(prefix + ".")]
        for _, target in moves:  # check all first: never leave a rename half done
            _checkDirname(target)
        for entry, target in moves:
            os.rename(os.path.join(self.root, entry), os.path.join(self.root, target))
        parent = new.rsplit(folders.SEPARATOR, 1)[0] if folders.SEPARATOR in new else None
        if parent and not os.path.isdir(os.path.join(self.folderPath(parent), "cur")):
            self._createSync(parent, self.folderPath(parent))
        _fsutil.fsyncDir(self.root)


@implementer(IMailStore)
class MaildirStore(FileStore):
    """All accounts' Maildirs under ``<data_dir>/mail``."""

    tree = "mail"
    accountClass = MaildirAccount
    folderClass = MaildirFolder
    watchMask = ("IN_CREATE", "IN_MOVED_TO", "IN_MOVED_FROM", "IN_DELETE")

    def __init__(self, dataDir: str, deferToThread=threads.deferToThread, reactor=None) -> None:
        super().__init__(dataDir, deferToThread, reactor)
        self._commit = GroupCommit(deferToThread)

    def deliver(self, account: str, folder: str, source, flags=()) -> defer.Deferred:
        try:
            acct = self.account(account)
            path = acct.folderPath(folder)
        except StorageError:
            return defer.fail()
        d = self._commit.submit(lambda: [self._stageDelivery(acct.root, path, source)])

        def delivered(paths: list[str]) -> str:
            self._refreshIfListened(acct.name, folders.normalize(folder))
            return os.path.basename(paths[0]).split(",")[0]

        return d.addCallback(delivered)

    def _stageDelivery(self, root: str, path: str, source) -> NewFile:
        if not os.path.isdir(os.path.join(path, "tmp")):
            try:
                makeMaildir(root)
                makeMaildir(path)
                # Any of these may have gained an entry: path's tmp/new/cur, root's
                # .Folder or tmp/new/cur, the domain's account, mail/'s domain,
                # the data dir's mail/.  A 250 needs every link to the file durable.
                for directory in dict.fromkeys((path, root, os.path.dirname(root), self.root,
                                                os.path.dirname(self.root))):
                    _fsutil.fsyncDir(directory)
            except OSError as e:
                raise StorageError(f"cannot create Maildir {path}: {e.strerror}") from e
        return stageMessage(path, source.chunks(), "new")

    def removeAccount(self, name: str) -> defer.Deferred:
        path = self.accountPath(name)
        return self._run(shutil.rmtree, path, True)


@implementer(IMailStoreFactory)
class MaildirStoreFactory:
    """Registered by L{twistmail.plugins.twistmail_builtin}."""

    name = "maildir"
    description = "Maildir++ folders, one file per message (default)"

    def makeStore(self, options: dict, dataDir: str) -> MaildirStore:
        from twistmail.config import ConfigError

        if options:
            raise ConfigError(f"[storage.maildir] {', '.join(sorted(options))}: unknown option. "
                              "Fix: remove it (the Maildir backend has no options)")
        return MaildirStore(dataDir)
