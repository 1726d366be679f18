# -*- test-case-name: tests.test_store_conformance -*-
"""PostgresStore: mail in PostgreSQL, so several twistmail nodes can share it.

The reactor never waits for the database: every transaction (L{_queries}) runs
in this store's own thread pool through C{deferToThreadPool}, each on a
connection from a psycopg_pool C{ConnectionPool} of the same size.  We use
psycopg's blocking API there rather than its asyncio one: Twisted would need
the asyncio reactor for that, and every other backend already runs its blocking
work the same way.

Each open folder is one L{PostgresMailbox} per process (shared by every session
that opens it): a snapshot of UIDs, flags and modseqs, brought up to date by
L{PostgresMailbox.refresh}, which reads only what changed since the snapshot's
highest modseq.  Changes this process makes refresh the snapshot and call its
listeners; changes another node makes arrive by LISTEN/NOTIFY (L{push}), which
refreshes the folders named, or at the latest at the slow fallback poll.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from twistmail._logtext import loggable
from twistmail.auth.accounts import AccountError, validAddress
from twistmail.errors import FolderExists, InvalidFolderName, NoSuchFolder, StorageError
from twistmail.interfaces import (
    IImportableMailbox,
    IMailAccount,
    IMailStore,
    IMailStoreFactory,
    IModSeqMailbox,
)
from twistmail.model import FolderChanges, StoredMessage
from twistmail.storage import flagColumnOf, folders
from twistmail.storage.postgresql import _queries, push, schema

log = Logger()

#: Seconds between refreshes of a folder while sessions listen to it (IMAP IDLE) and
#: this node is not listening for notifications (PostgreSQL down, LISTEN refused).
POLL_INTERVAL = 1.0
#: Seconds between refreshes of a listened-to folder while notifications arrive: a
#: fallback for the notification of a node that crashed between its commit and its notify.
FALLBACK_INTERVAL = 30.0


def _chunksOf(source):
    """The bytes of an append's source: bytes, or a MessageSource (read in the worker)."""
    return [source] if isinstance(source, bytes) else source.chunks()


def _normalized(f, *names):
    """Call f with the names normalized, or fail the Deferred with InvalidFolderName."""
    try:
        names = [folders.normalize(n) for n in names]
    except StorageError:
        return defer.fail()
    return f(*names)


@implementer(IModSeqMailbox, IImportableMailbox)
class PostgresMailbox:
    """One folder's snapshot, shared by every session of this process that opened it."""

    maxKeywords = _queries.MAX_KEYWORDS

    def __init__(self, store: PostgresStore, name: str, folderId: int) -> None:
        self._store = store
        self.name = name
        self._id = folderId
        self.uidValidity = 0
        self.uidNext = 1
        self.highestModSeq = 0
        self._messages: dict[int, StoredMessage] = {}
        self._uids: tuple = ()
        self._keywords: list[str] = []
        #: (modseq, uid) of the expunges known, oldest first, at most MAX_VANISHED.
        self._vanished: deque = deque()
        self._vanishedFrom = 0  # vanishedSince(m) is complete for m >= this
        self._listeners: list = []
        self._refreshing = defer.DeferredLock()
        self._refreshQueued = False
        self._lastRefresh = 0.0
        self._poll: task.LoopingCall | None = None

    # -- the snapshot (synchronous) -------------------------------------------------

    def messages(self) -> list:
        return list(self._messages.values())

    def flagColumn(self) -> list:
        return flagColumnOf(self._messages.values())

    def uids(self) -> tuple:
        return self._uids

    def message(self, uid: int):
        return self._messages.get(uid)

    def keywords(self) -> list:
        return list(self._keywords)

    def changedSince(self, modseq: int) -> list:
        return [m.uid for m in self._messages.values() if m.modseq > modseq]

    def vanishedSince(self, modseq: int):
        if modseq < self._vanishedFrom:
            return None
        return sorted(uid for seen, uid in self._vanished if seen > modseq)

    # -- bringing it up to date -----------------------------------------------------

    def refresh(self) -> defer.Deferred:
        """One refresh at a time: each applies what changed after the one before."""
        return self._refreshing.run(self._refreshNow)

    def _refreshNow(self) -> defer.Deferred:
        self._lastRefresh = self._store._reactor.seconds()
        return self._store._run(_queries.snapshot, self._id, self.highestModSeq).addCallback(
            self._apply)

    def refreshSoon(self) -> None:
        """Refresh after the refresh under way, if any (it may have read before the change
        we were told of); one waiting refresh covers every signal that came meanwhile."""
        if self._refreshQueued:
            return
        self._refreshQueued = True

        def refresh():
            self._refreshQueued = False
            return self._refreshNow()
        self._refreshing.run(refresh).addErrback(self._pollFailed)

    def _apply(self, state: dict | None) -> FolderChanges:
        if state is None:  # deleted by someone: sessions that have it selected say BYE
            self._messages, self._uids = {}, ()
            raise NoSuchFolder(self.name)
        added, flagsChanged, removed, expunged = [], [], [], []
        for uid, uniqueId, flags, size, date, modseq in state["changed"]:
            stored = StoredMessage(uid, uniqueId, frozenset(flags), size, date, modseq)
            old = self._messages.get(uid)
            if old is None:
                added.append(uid)
            elif old.flags != stored.flags:
                flagsChanged.append(uid)
            self._messages[uid] = stored
        vanished = state["vanished"]
        if self.highestModSeq == 0 and len(vanished) > _queries.MAX_VANISHED:
            self._vanishedFrom = vanished[0][0]  # first load: older ones were left out
            vanished = vanished[1:]
        for modseq, uid in vanished:
            self._vanished.append((modseq, uid))
            gone = self._messages.pop(uid, None)
            if gone is not None:
                removed.append(uid)
                expunged.append(gone)
        while len(self._vanished) > _queries.MAX_VANISHED:
            self._vanishedFrom = self._vanished.popleft()[0]
        if added or removed:
            self._messages = dict(sorted(self._messages.items()))
            self._uids = tuple(self._messages)
        self.uidValidity = state["uidValidity"]
        self.uidNext = state["uidNext"]
        self.highestModSeq = max(self.highestModSeq, state["highestModSeq"])
        self._keywords = sorted(state["keywords"])
        return self._notify(FolderChanges(added=tuple(added), removed=tuple(sorted(removed)),
                                          flagsChanged=tuple(flagsChanged),
                                          expunged=tuple(expunged)))

    def _notify(self, changes: FolderChanges) -> FolderChanges:
        if changes:
            for listener in list(self._listeners):
                try:
                    listener(changes)
                except Exception:
                    log.failure("folder listener failed for {folder}", folder=loggable(self.name))
        return changes

    def _write(self, f, *args) -> defer.Deferred:
        """Run a transaction on this folder, then refresh (which tells the listeners)."""
        d = self._store._run(f, self._id, *args, changed=lambda _: [self._id])
        return d.addCallback(lambda result: self.refresh().addCallback(lambda _: result))

    # -- reading --------------------------------------------------------------------

    def openMessage(self, uid: int) -> defer.Deferred:
        return self._store._run(_queries.openMessage, self._id, uid)

    def readMessages(self, uids) -> defer.Deferred:
        return self._store._run(_queries.readMessages, self._id, list(uids))

    # -- changing -------------------------------------------------------------------

    def _updated(self, uids) -> list:
        return [self._messages[u] for u in sorted(set(uids)) if u in self._messages]

    def setFlags(self, uids, flags, mode: str) -> defer.Deferred:
        return self._write(_queries.setFlags, list(uids), frozenset(flags), mode).addCallback(
            lambda ignored: self._updated(uids))

    def setFlagsUnchangedSince(self, uids, flags, mode: str, modseq: int) -> defer.Deferred:
        d = self._write(_queries.setFlags, list(uids), frozenset(flags), mode, modseq)
        return d.addCallback(
            lambda modified: (self._updated(set(uids) - set(modified)), sorted(modified)))

    def append(self, source, flags=(), internalDate: float | None = None) -> defer.Deferred:
        date = int(time.time() if internalDate is None else internalDate)
        return self._write(_queries.append, _chunksOf(source), frozenset(flags), date).addCallback(
            lambda result: result[0])

    def importMessages(self, messages) -> defer.Deferred:
        def importAll(conn, folder):
            return [_queries.append(conn, folder, _chunksOf(source), frozenset(flags),
                                    int(date), uniqueId)[0]
                    for source, flags, date, uniqueId in messages]
        return self._write(importAll)

    def copyMessages(self, uids, target: PostgresMailbox) -> defer.Deferred:
        d = self._store._run(_queries.copyMessages, self._id, list(uids), target._id,
                             changed=lambda _: [target._id])
        return d.addCallback(lambda pairs: target.refresh().addCallback(lambda _: pairs))

    def remove(self, uids) -> defer.Deferred:
        return self._write(_queries.remove, list(uids))

    def addListener(self, listener) -> None:
        self._listeners.append(listener)
        self._store._listen()
        if self._poll is None:
            self._poll = task.LoopingCall(self._pollOnce)
            self._poll.clock = self._store._reactor
            self._poll.start(POLL_INTERVAL, now=False)

    def removeListener(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners and self._poll is not None:
            self._poll.stop()
            self._poll = None

    def _pollOnce(self) -> None:
        """While listened to: pick up other nodes' changes (IDLE push across nodes)."""
        if self._refreshing.locked:
            return  # a refresh is under way: it will see them
        if (self._store._pushing and self._store._reactor.seconds() - self._lastRefresh
                < FALLBACK_INTERVAL):
            return  # notifications bring other nodes' changes
        self.refresh().addErrback(self._pollFailed)

    def _pollFailed(self, failure) -> None:
        self._lastRefresh = float("-inf")  # the next poll tries again, pushed to or not
        if failure.check(StorageError):  # the database is down: said once per poll, briefly
            log.warn("refreshing {folder} failed: {error}", folder=loggable(self.name),
                     error=failure.getErrorMessage())
        elif not failure.check(NoSuchFolder):  # the sessions learn that at their next command
            log.failure("refreshing {folder} failed", failure, folder=loggable(self.name))


@implementer(IMailAccount)
class PostgresAccount:
    def __init__(self, store: PostgresStore, name: str) -> None:
        self._store = store
        self.name = name

    def listFolders(self) -> defer.Deferred:
        return self._store._run(_queries.listFolders, self.name).addCallback(
            lambda names: sorted(set(names) | {"INBOX"}, key=lambda n: (n != "INBOX", n)))

    def createFolder(self, name: str) -> defer.Deferred:
        if isinstance(name, str) and folders.isInbox(name):
            return defer.fail(FolderExists("INBOX"))
        return _normalized(lambda n: self._store._run(_queries.createFolder, self.name, n), name)

    def deleteFolder(self, name: str) -> defer.Deferred:
        def delete(name):
            if name == "INBOX":
                return defer.fail(StorageError("INBOX cannot be deleted"))
            return self._store._run(_queries.deleteFolder, self.name, name,
                                    changed=lambda folderId: [folderId]).addCallback(
                self._store._changed)
        return _normalized(delete, name)

    def renameFolder(self, old: str, new: str) -> defer.Deferred:
        def rename(old, new):
            if new == "INBOX":
                return defer.fail(FolderExists(new))
            if new.startswith(old + folders.SEPARATOR):
                return defer.fail(InvalidFolderName("a folder cannot move into its own child"))
            d = self._store._run(_queries.renameFolder, self.name, old, new)
            if old == "INBOX":
                d.addCallback(lambda _: self._store._run(_queries.openFolder, self.name, "INBOX",
                                                         changed=lambda inbox: [inbox]))
                d.addCallback(self._store._changed)
            return d.addCallback(lambda _: None)
        return _normalized(rename, old, new)

    def openFolder(self, name: str) -> defer.Deferred:
        def open(name):
            d = self._store._run(_queries.openFolder, self.name, name)
            return d.addCallback(self._store._mailbox, name)
        return _normalized(open, name)

    def subscriptions(self) -> defer.Deferred:
        return self._store._run(_queries.subscriptions, self.name).addCallback(sorted)

    def setSubscribed(self, name: str, subscribed: bool) -> defer.Deferred:
        return _normalized(lambda n: self._store._run(_queries.setSubscribed, self.name, n,
                                                      bool(subscribed)), name)


@implementer(IMailStore)
class PostgresStore(service.Service):
    """Every account's mail in one PostgreSQL database (the schema the DSN's search_path names).

    @param dsn: a libpq connection string.
    @param minConnections: connections the pool keeps open.
    @param maxConnections: connections (and worker threads) at most.
    @param connectTimeout: seconds a transaction waits for a connection before it fails
        with StorageError (SMTP 451, IMAP NO).
    """

    def __init__(self, dsn: str, minConnections: int = 1, maxConnections: int = 10,
                 connectTimeout: float = 10.0, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.dsn = dsn
        self._reactor = reactor
        self._minConnections = minConnections
        self._connectTimeout = connectTimeout
        self._threads = ThreadPool(0, maxConnections, name="postgresql")
        self._pool = None
        self._opening = threading.Lock()
        self._started = False
        #: folder id -> its one open PostgresMailbox; weak: bounded by what sessions hold.
        self._mailboxes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        #: Other nodes' changes: our notifications' name, their channel (known once the
        #: pool is open), the listening thread, and whether it is listening now.
        self._node = push.newNodeToken()
        self._channel: str | None = None
        self._listener: push.Listener | None = None
        self._pushing = False

    # -- the thread pool and the connection pool ------------------------------------

    def _connectionPool(self):
        """Open the pool on first use, in a worker, and check the schema version once."""
        with self._opening:
            if self._pool is None:
                from psycopg_pool import ConnectionPool

                pool = ConnectionPool(self.dsn, min_size=self._minConnections,
                                      max_size=self._threads.max, open=False,
                                      timeout=self._connectTimeout)
                pool.open(wait=False)
                try:
                    with pool.connection() as conn:
                        version = schema.currentVersion(conn)
                        self._channel = conn.execute(push.channelQuery()).fetchone()[0]
                except BaseException:
                    pool.close()  # the next transaction tries again, with a new pool
                    raise
                if version != schema.LATEST:
                    pool.close()
                    raise StorageError(
                        f"the database has twistmail schema version {version}, this twistmail "
                        f"needs {schema.LATEST}: run 'twistmail db upgrade'")
                self._pool = pool
        return self._pool

    def _transaction(self, f, *args, changed=None):
        import psycopg

        try:
            with self._connectionPool().connection() as conn:
                with conn.transaction():
                    result = f(conn, *args)
                if changed is not None:
                    self._announce(conn, changed(result))
                return result
        except psycopg.Error as e:
            # The database is down or refused: a temporary failure (SMTP 451, IMAP NO).
            raise StorageError(f"database error: {type(e).__name__}: {e}".strip()) from e
        except StorageError:
            raise
        except Exception as e:  # psycopg_pool.PoolTimeout and the like
            raise StorageError(f"database unavailable: {type(e).__name__}: {e}") from e

    def _announce(self, conn, folderIds) -> None:
        """Tell the other nodes, after the commit (see L{push}).  The change is committed
        whatever happens here: a failure is only logged, the fallback poll covers it."""
        folderIds = [i for i in folderIds if i is not None]
        if not folderIds:
            return
        try:
            push.notify(conn, self._channel, self._node, folderIds)
        except Exception as e:
            log.warn("could not tell other nodes of a change ({error}); they see it at "
                     "their next poll", error=f"{type(e).__name__}: {e}")

    def _run(self, f, *args, changed=None) -> defer.Deferred:
        """Run transaction C{f} in a worker; C{changed(result)}: the folder ids it changed,
        announced to the other nodes after the commit."""
        self._start()
        return deferToThreadPool(self._reactor, self._threads, self._transaction, f, *args,
                                 changed=changed)

    # -- other nodes' changes -----------------------------------------------------------

    def _listen(self) -> None:
        """Start listening for other nodes' changes (once: when a session first listens)."""
        if self._listener is not None:
            return
        import psycopg

        call = self._reactor.callFromThread
        self._listener = push.Listener(
            lambda: psycopg.connect(self.dsn, connect_timeout=int(self._connectTimeout)),
            self._node,
            onChanged=lambda ids: call(self._pushed, ids),
            onListening=lambda channel: call(self._listening, channel),
            onLost=lambda: call(self._lost))
        self._listener.start()
        self._start()  # close() at shutdown stops the listener too

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._threads.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.close)

    def _watched(self, ids=None) -> list[PostgresMailbox]:
        """The open folders sessions listen to (of C{ids}, if given)."""
        mailboxes = list(self._mailboxes.values()) if ids is None else \
            [self._mailboxes.get(i) for i in ids]
        return [m for m in mailboxes if m is not None and m._listeners]

    def _pushed(self, folderIds: list[int]) -> None:
        for mailbox in self._watched(folderIds):
            mailbox.refreshSoon()

    def _listening(self, channel: str) -> None:
        """Listening (again): notifications sent while we were not are lost, so refresh
        every watched folder once."""
        self._pushing = True
        log.info("postgresql: listening for other nodes' changes on channel {channel}",
                 channel=channel)
        # After a PostgreSQL restart the pooled connections are broken: replace them
        # first, so the refreshes (and this node's next writes) do not fail on them.
        deferToThreadPool(self._reactor, self._threads, self._checkPool).addBoth(
            lambda _: [mailbox.refreshSoon() for mailbox in self._watched()])

    def _checkPool(self) -> None:
        if self._pool is not None:
            self._pool.check()

    def _lost(self) -> None:
        self._pushing = False  # the polls take over until we listen again

    def transaction(self, f, *args) -> defer.Deferred:
        """C{f(conn, *args)} in one transaction in this store's workers (StorageError when the
        database fails): for L{twistmail.relay.pgqueue}, which shares the pool."""
        return self._run(f, *args)

    def stopService(self):
        """The server stops: close the connections (the listeners stopped first)."""
        self.close()
        return super().stopService()

    def close(self) -> None:
        """Stop the workers and close the connections (at reactor shutdown, or by a test)."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
            self._pushing = False
        if self._started:
            self._threads.stop()
            self._started = False
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- folders shared within the process ------------------------------------------

    def _mailbox(self, folderId: int, name: str) -> defer.Deferred:
        mailbox = self._mailboxes.get(folderId)
        if mailbox is None:
            mailbox = self._mailboxes[folderId] = PostgresMailbox(self, name, folderId)
        mailbox.name = name
        return mailbox.refresh().addCallback(lambda _: mailbox)

    def _changed(self, folderIds) -> defer.Deferred | None:
        """Refresh this process's open copies of the folders, which tells their listeners."""
        ids = folderIds if isinstance(folderIds, list) else [folderIds]
        open_ = [self._mailboxes.get(i) for i in ids]
        return defer.gatherResults(
            [m.refresh().addErrback(lambda f: f.trap(NoSuchFolder)) for m in open_ if m],
            consumeErrors=True).addCallback(lambda _: None)

    # -- IMailStore -------------------------------------------------------------------

    def account(self, name: str) -> PostgresAccount:
        try:
            return PostgresAccount(self, validAddress(name))
        except AccountError as e:
            raise StorageError(str(e)) from None

    def deliver(self, account: str, folder: str, source, flags=()) -> defer.Deferred:
        try:
            name = self.account(account).name
            folder = folders.normalize(folder)
        except StorageError:
            return defer.fail()
        d = self._run(_queries.deliver, name, folder, source.chunks(), frozenset(flags),
                      int(time.time()), changed=lambda result: [result[0]])

        def delivered(result):
            folderId, uniqueId = result
            mailbox = self._mailboxes.get(folderId)
            if mailbox is not None and mailbox._listeners:
                mailbox.refresh().addErrback(lambda f: log.failure(
                    "refresh after delivery to {account} failed", f, account=loggable(name)))
            return uniqueId

        return d.addCallback(delivered)

    def removeAccount(self, name: str) -> defer.Deferred:
        try:
            name = self.account(name).name
        except StorageError:
            return defer.fail()
        return self._run(_queries.removeAccount, name, changed=lambda ids: ids).addCallback(
            self._changed)


def _positiveInt(options: dict, key: str, default: int, minimum: int) -> int:
    from twistmail.config import ConfigError

    value = options.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"[storage.postgresql] {key}: expected a whole number >= {minimum}, "
                          f"got {value!r}. Fix: write e.g. {key} = {default}")
    return value


@implementer(IMailStoreFactory)
class PostgresStoreFactory:
    name = "postgresql"
    description = "messages, flags and folders in PostgreSQL, shared by several nodes"

    def makeStore(self, options: dict, dataDir: str) -> PostgresStore:
        from twistmail.config import ConfigError

        options = dict(options)
        dsn = options.pop("dsn", None)
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigError("[storage.postgresql] dsn: missing or empty. Fix: write e.g. "
                              "dsn = \"host=/run/postgresql dbname=twistmail user=twistmail\"")
        minimum = _positiveInt(options, "pool_min", 1, 0)
        maximum = _positiveInt(options, "pool_max", 10, 1)
        timeout = _positiveInt(options, "connect_timeout", 10, 1)
        if options:
            raise ConfigError(f"[storage.postgresql] {', '.join(sorted(options))}: unknown "
                              "option. Fix: use dsn, pool_min, pool_max or connect_timeout")
        if minimum > maximum:
            raise ConfigError(f"[storage.postgresql] pool_min: {minimum} is above pool_max "
                              f"({maximum}). Fix: make pool_min <= pool_max")
        return PostgresStore(dsn, minConnections=minimum, maxConnections=maximum,
                             connectTimeout=float(timeout))
