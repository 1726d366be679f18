# -*- test-case-name: tests.test_plugins -*-
"""MemoryStore: a complete IMailStore kept in memory, for tests.

Policy and protocol tests deliver into it instead of a Maildir, and it passes
L{twistmail.testing.StoreConformanceTests} (tests/plugins/examplestore.py
offers it as the example third-party backend).  Mail lives as long as the
process: useless in production.
"""

from __future__ import annotations

import io
import itertools
import time

from twisted.internet import defer
from zope.interface import implementer

from twistmail.auth.accounts import AccountError, validAddress
from twistmail.errors import FolderExists, NoSuchFolder, NoSuchMessage, StorageError
from twistmail.interfaces import IMailAccount, IMailbox, IMailStore
from twistmail.model import FolderChanges, StoredMessage
from twistmail.storage import flagColumnOf, folders

#: data directory -> account -> folder name -> _State
_DATA: dict[str, dict[str, dict]] = {}
_uniqueIds = itertools.count(1)
_validities = itertools.count(int(time.time()))


class _State:
    """One folder; shared by every IMailbox opened on it."""

    def __init__(self) -> None:
        self.uidValidity = next(_validities)
        self.uidNext = 1
        self.messages: dict[int, tuple[StoredMessage, bytes]] = {}
        self.keywords: set[str] = set()
        self.listeners: list = []

    def add(self, data: bytes, flags, date: float, uniqueId: str | None = None) -> int:
        uid, self.uidNext = self.uidNext, self.uidNext + 1
        flags = frozenset(flags)
        self.keywords.update(f for f in flags if not f.startswith("\\"))
        uniqueId = uniqueId or f"example-{next(_uniqueIds)}"
        self.messages[uid] = (StoredMessage(uid, uniqueId, flags, len(data), int(date)), data)
        return uid

    def notify(self, changes: FolderChanges) -> None:
        for listener in list(self.listeners):
            listener(changes)


@implementer(IMailbox)
class MemoryMailbox:
    maxKeywords = None

    def __init__(self, name: str, state: _State, account: MemoryAccount) -> None:
        self.name = name
        self._state = state
        self._account = account

    @property
    def uidValidity(self) -> int:
        return self._state.uidValidity

    @property
    def uidNext(self) -> int:
        return self._state.uidNext

    def _live(self) -> _State:
        if self._account._folders().get(self.name) is not self._state:
            raise NoSuchFolder(self.name)
        return self._state

    def messages(self) -> list:
        return [m for m, _ in self._state.messages.values()]

    def flagColumn(self) -> list:
        return flagColumnOf(self.messages())

    def uids(self) -> tuple:
        return tuple(self._state.messages)

    def message(self, uid: int):
        found = self._state.messages.get(uid)
        return found[0] if found else None

    def keywords(self) -> list:
        return sorted(self._state.keywords)

    def refresh(self) -> defer.Deferred:
        return defer.succeed(FolderChanges())

    def readMessages(self, uids) -> defer.Deferred:
        try:
            return defer.succeed([self._state.messages[uid][1] for uid in uids])
        except KeyError as e:
            return defer.fail(NoSuchMessage(e.args[0]))

    def openMessage(self, uid: int) -> defer.Deferred:
        return self.readMessages([uid]).addCallback(lambda datas: io.BytesIO(datas[0]))

    def setFlags(self, uids, flags, mode: str) -> defer.Deferred:
        flags, changed = frozenset(flags), []
        for uid in sorted(set(uids) & set(self._state.messages)):
            stored, data = self._state.messages[uid]
            wanted = flags if mode == "set" else (stored.flags | flags if mode == "add"
                                                  else stored.flags - flags)
            if wanted != stored.flags:
                self._state.messages[uid] = (stored._replace(flags=wanted), data)
                self._state.keywords.update(f for f in wanted if not f.startswith("\\"))
                changed.append(uid)
        if changed:
            self._state.notify(FolderChanges(flagsChanged=tuple(changed)))
        return defer.succeed([self._state.messages[u][0] for u in sorted(set(uids))
                              if u in self._state.messages])

    def append(self, source, flags=(), internalDate: float | None = None) -> defer.Deferred:
        try:
            state = self._live()
        except NoSuchFolder:
            return defer.fail()
        data = source if isinstance(source, bytes) else source.getvalue()
        uid = state.add(data, flags, time.time() if internalDate is None else internalDate)
        state.notify(FolderChanges(added=(uid,)))
        return defer.succeed(uid)

    def copyMessages(self, uids, target: MemoryMailbox) -> defer.Deferred:
        try:
            copies = [self._state.messages[uid] for uid in uids]
        except KeyError as e:
            return defer.fail(NoSuchMessage(e.args[0]))
        pairs = [(uid, target._state.add(data, stored.flags, stored.internalDate))
                 for uid, (stored, data) in zip(uids, copies, strict=True)]
        target._state.notify(FolderChanges(added=tuple(new for _, new in pairs)))
        return defer.succeed(pairs)

    def remove(self, uids) -> defer.Deferred:
        gone = [uid for uid in sorted(set(uids)) if self._state.messages.pop(uid, None)]
        if gone:
            self._state.notify(FolderChanges(removed=tuple(gone)))
        return defer.succeed(gone)

    def addListener(self, listener) -> None:
        self._state.listeners.append(listener)

    def removeListener(self, listener) -> None:
        if listener in self._state.listeners:
            self._state.listeners.remove(listener)


@implementer(IMailAccount)
class MemoryAccount:
    def __init__(self, store: MemoryStore, name: str) -> None:
        self._store = store
        self.name = name

    def _folders(self) -> dict:
        account = self._store._data.setdefault(self.name, {})
        account.setdefault("INBOX", _State())
        return account

    def listFolders(self) -> defer.Deferred:
        return defer.succeed(sorted(self._folders(), key=lambda n: (n != "INBOX", n)))

    def createFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
        except StorageError:
            return defer.fail()
        if name in self._folders():
            return defer.fail(FolderExists(name))
        parts = name.split(folders.SEPARATOR)
        for depth in range(1, len(parts) + 1):
            self._folders().setdefault(folders.SEPARATOR.join(parts[:depth]), _State())
        return defer.succeed(None)

    def deleteFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
        except StorageError:
            return defer.fail()
        if name == "INBOX":
            return defer.fail(StorageError("INBOX cannot be deleted"))
        if self._folders().pop(name, None) is None:
            return defer.fail(NoSuchFolder(name))
        return defer.succeed(None)

    def renameFolder(self, old: str, new: str) -> defer.Deferred:
        try:
            old, new = folders.normalize(old), folders.normalize(new)
        except StorageError:
            return defer.fail()
        existing = self._folders()
        if old not in existing:
            return defer.fail(NoSuchFolder(old))
        if new in existing:
            return defer.fail(FolderExists(new))
        self.createFolder(new)
        if old == "INBOX":  # RFC 3501 §6.3.5: the messages move, INBOX stays
            inbox, moved = existing["INBOX"], existing[new]
            for stored, data in inbox.messages.values():
                moved.add(data, stored.flags, stored.internalDate, stored.uniqueId)
            gone, inbox.messages = tuple(inbox.messages), {}
            inbox.notify(FolderChanges(removed=gone))
            return defer.succeed(None)
        for name in [n for n in existing if n == old or n.startswith(old + folders.SEPARATOR)]:
            existing[new + name[len(old):]] = existing.pop(name)
        return defer.succeed(None)

    def openFolder(self, name: str) -> defer.Deferred:
        try:
            name = folders.normalize(name)
        except StorageError:
            return defer.fail()
        state = self._folders().get(name)
        if state is None:
            return defer.fail(NoSuchFolder(name))
        return defer.succeed(MemoryMailbox(name, state, self))

    def subscriptions(self) -> defer.Deferred:
        return defer.succeed(sorted(self._store._subscriptions.setdefault(self.name, set())))

    def setSubscribed(self, name: str, subscribed: bool) -> defer.Deferred:
        try:
            name = folders.normalize(name)
        except StorageError:
            return defer.fail()
        names = self._store._subscriptions.setdefault(self.name, set())
        names.add(name) if subscribed else names.discard(name)
        return defer.succeed(None)


@implementer(IMailStore)
class MemoryStore:
    """Every account's folders in dicts.

    @param dataDir: stores made with one data directory share their mail (within
        this process), as a server restarted on it would; None = a store of its own.
    @param quota: messages per folder past which delivery fails with StorageError.
    """

    def __init__(self, dataDir: str | None = None, quota: int | None = None) -> None:
        self._quota = quota
        if dataDir is None:
            self._data, self._subscriptions = {}, {}
        else:
            self._data = _DATA.setdefault(dataDir, {})
            self._subscriptions = _DATA.setdefault(dataDir + "\0subscriptions", {})

    def folder(self, account: str, folder: str = "INBOX") -> list[bytes]:
        """The messages of one folder, in UID order (for assertions)."""
        state = self._data.get(account.lower(), {}).get(folders.normalize(folder))
        return [data for _, data in state.messages.values()] if state else []

    def account(self, name: str) -> MemoryAccount:
        try:
            return MemoryAccount(self, validAddress(name))
        except AccountError as e:
            raise StorageError(str(e)) from None

    def deliver(self, account: str, folder: str, source, flags=()) -> defer.Deferred:
        try:
            state = self.account(account)._folders()
            name = folders.normalize(folder)
        except StorageError:
            return defer.fail()
        if name not in state:
            self.account(account).createFolder(name)
        if self._quota is not None and len(state[name].messages) >= self._quota:
            return defer.fail(StorageError(f"{account} is over its quota"))
        uid = state[name].add(source.getvalue(), flags, time.time())
        state[name].notify(FolderChanges(added=(uid,)))
        return defer.succeed(state[name].messages[uid][0].uniqueId)

    def removeAccount(self, name: str) -> defer.Deferred:
        self._data.pop(name.lower(), None)
        return defer.succeed(None)
