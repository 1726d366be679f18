# -*- test-case-name: tests.test_migrate -*-
"""``twistmail migrate --to BACKEND (ADDRESS... | --all)``: move mailboxes to another backend.

Works through the storage interface only, so any two backends (plugins
too) can be migrated between.  For each account, every folder is copied in
order with its flags, keywords and internal dates, the subscriptions too,
and the POP3 unique ids where the target can keep them
(L{IImportableMailbox}).  UIDs are renumbered (1, 2, ... in the same order)
under a new UIDVALIDITY: IMAP clients resynchronise each folder once.

Safety:

* the data directory lock (``twistmail.lock``, held by a running ``twistd``)
  is taken for the whole run: a running server makes it refuse, and no
  server can start meanwhile;
* an account whose target already holds mail is refused before anything
  is written;
* for the built-in backends each account is built in a staging directory
  and renamed into place when complete, so an interrupted run leaves no
  half-migrated account (run it again);
* the source is left untouched: remove it once satisfied.
"""

from __future__ import annotations

import fcntl
import os
import shutil

from twisted.internet import defer
from twisted.python.failure import Failure

from twistmail import _fsutil, _pluginload
from twistmail.config import Config, ConfigError
from twistmail.errors import FolderExists, StorageError
from twistmail.interfaces import IImportableMailbox, IMailStoreFactory

#: Messages read and written in one go, at most (and at most BATCH_BYTES of them).
BATCH = 500
BATCH_BYTES = 16 * 1024 * 1024
STAGING = "migrate.tmp"


class MigrationError(Exception):
    """Printed as one line; nothing was changed for the account it names."""


class DataDirLock:
    """The lock twistd holds (tap._DataDirLock): taken without waiting, or refused."""

    def __init__(self, dataDir: str) -> None:
        self.path = os.path.join(dataDir, "twistmail.lock")
        self._file = None

    def __enter__(self) -> DataDirLock:
        self._file = open(self.path, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise MigrationError(f"{self.path} is locked: a twistmail server is running on this "
                                 "data directory. Fix: stop it, migrate, then start it with the "
                                 "new backend") from None
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def _factory(name: str) -> IMailStoreFactory:
    return _pluginload.find(IMailStoreFactory, name, "--to", "backend")


class Migration:
    def __init__(self, config: Config, to: str, report=print) -> None:
        self.config = config
        self.source = config["storage"]["backend"]
        self.target = to
        self.report = report
        if to == self.source:
            raise MigrationError(f"{config.path}: [storage] backend is already {to!r}. Fix: "
                                 "name the backend to migrate to, or set [storage] backend to "
                                 "the one the mail is in now")
        try:
            self.sourceStore = _factory(self.source).makeStore(config.storageOptions(),
                                                               config.dataDir)
            targetFactory = _factory(to)
            targetOptions = dict(config.backendOptions.get(to, {}))
            self.targetStore = targetFactory.makeStore(targetOptions, config.dataDir)
            self.stagingDir = os.path.join(config.dataDir, STAGING)
            self.stagingStore = targetFactory.makeStore(targetOptions, self.stagingDir)
        except ConfigError as e:
            raise MigrationError(f"{config.path}: {e}") from None

    def _paths(self, address: str) -> tuple[str, str] | None:
        """(staging, final) account directories, for backends that keep an account in one."""
        accountPath = getattr(self.targetStore, "accountPath", None)
        if accountPath is None:
            return None
        return self.stagingStore.accountPath(address), accountPath(address)

    async def _hasMail(self, store, address: str) -> bool:
        account = store.account(address)
        for name in await account.listFolders():
            folder = await account.openFolder(name)
            if folder.uids():
                return True
        return False

    async def check(self, addresses: list[str]) -> None:
        """Refuse before writing anything if any target account already has mail."""
        for address in addresses:
            paths = self._paths(address)
            if paths is not None:
                if os.path.exists(paths[1]) and os.listdir(paths[1]):
                    raise MigrationError(f"{address}: {paths[1]} already exists. Fix: remove it "
                                         "if it holds nothing you need, then run migrate again")
            elif await self._hasMail(self.targetStore, address):
                raise MigrationError(f"{address}: already has mail in the {self.target} backend. "
                                     "Fix: empty that account first")

    async def run(self, addresses: list[str]) -> None:
        await self.check(addresses)
        for address in addresses:
            folders, messages = await self.account(address)
            self.report(f"{address}: {folders} folders, {messages} messages "
                        f"({self.source} -> {self.target})")

    async def account(self, address: str) -> tuple[int, int]:
        paths = self._paths(address)
        if paths is None:
            return await self._copy(address, self.targetStore)
        staging, final = paths
        shutil.rmtree(staging, ignore_errors=True)  # a run that was interrupted
        counts = await self._copy(address, self.stagingStore)
        os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
        if os.path.isdir(final) and not os.listdir(final):
            os.rmdir(final)
        os.rename(staging, final)
        _fsutil.fsyncDir(os.path.dirname(final))
        return counts

    async def _copy(self, address: str, target) -> tuple[int, int]:
        source, into = self.sourceStore.account(address), target.account(address)
        names = await source.listFolders()
        total = 0
        for name in names:
            if name != "INBOX":
                try:
                    await into.createFolder(name)
                except FolderExists:
                    pass  # made as the parent of one created before
            try:
                total += await self._folder(await source.openFolder(name),
                                            await into.openFolder(name))
            except StorageError as e:
                raise MigrationError(f"{address}: folder {name}: {e}. Fix: correct it in the "
                                     f"{self.source} backend and run migrate again") from None
        for name in await source.subscriptions():
            await into.setSubscribed(name, True)
        return len(names), total

    async def _folder(self, source, target) -> int:
        uids = list(source.uids())
        seen: set[str] = set()
        start = 0
        while start < len(uids):
            batch, size = [], 0
            for uid in uids[start:start + BATCH]:
                message = source.message(uid)
                if batch and size + message.size > BATCH_BYTES:
                    break
                batch.append(message)
                size += message.size
            start += len(batch)
            datas = await source.readMessages([m.uid for m in batch])
            items = []
            for message, data in zip(batch, datas, strict=True):
                unique = message.uniqueId if message.uniqueId not in seen else ""
                seen.add(message.uniqueId)
                items.append((data, message.flags, message.internalDate, unique))
            if IImportableMailbox.providedBy(target):
                await target.importMessages(items)
            else:
                for data, flags, internalDate, _ in items:
                    await target.append(data, flags, internalDate)
        return len(uids)


def migrate(config: Config, to: str, addresses: list[str], report=print) -> None:
    """Run the migration on a reactor of its own; raise MigrationError on failure."""
    from twisted.internet import reactor

    with DataDirLock(config.dataDir):
        migration = Migration(config, to, report)
        outcome: list = []

        def start() -> None:
            d = defer.ensureDeferred(migration.run(addresses))
            d.addBoth(outcome.append).addBoth(lambda ignored: reactor.stop())

        reactor.callWhenRunning(start)
        reactor.run()
        shutil.rmtree(migration.stagingDir, ignore_errors=True)
    if not outcome:
        raise MigrationError("interrupted: the accounts reported above were migrated, the others "
                             "were not. Fix: run migrate again for those")
    if isinstance(outcome[0], Failure):
        error = outcome[0].value
        if isinstance(error, MigrationError):
            raise error
        raise MigrationError(f"{type(error).__name__}: {error}")
