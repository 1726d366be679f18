# -*- test-case-name: tests.test_relay_queue_interface -*-
"""PostgresRelayQueue: the relay queue in PostgreSQL, shared by several nodes.

``[relay] queue = "postgresql"`` puts the queue in the database of
``[storage.postgresql]`` (tables ``relay_queue`` and ``relay_chunks``, made by
``twistmail db upgrade``), so any node may accept mail for relay and any node
may deliver it.  The entry is the disk queue's versioned JSON
(L{twistmail.relay.queue.QueueEntry}); the message is stored in chunks of
L{schema.CHUNK} octets as it is read, never whole in memory.

A node works a message only while it holds it: L{loadWithMessage} claims the
row with ``SELECT ... FOR UPDATE SKIP LOCKED`` (a node that finds it locked or
held by another node's live lease gets L{QueueClaimed} and leaves it), writes
``claimed_by`` and ``lease_until`` (the database's clock plus
``queue_lease_time``), and copies the message to a spool file under
``<data_dir>/queue/spool/`` for the sender, which reads it on the reactor
thread as it does a disk queue file.  While the attempt runs, a timer renews
the node's leases every third of the lease time; L{save}, L{remove} and
L{release} end the claim (one that fails while the database is down is written
before the message is next attempted, so it is not sent again).  A node that dies stops renewing: after
``queue_lease_time`` any node may take the message, with the per-recipient
state written last: the runner reports each part of an attempt as it succeeds
(L{PostgresRelayQueue.recordSent}), so recipients that got a 250 are not sent
again.

Each node polls every ``pickup_interval`` seconds for due messages nobody
holds (those other nodes queued, or whose holder died) and hands them to its
runner (L{watch}).  Every query runs in the store's worker threads, never on
the reactor; a database outage fails enqueue with StorageError (SMTP 451) and
the attempts (retried later), and the connection pool reconnects by itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from zope.interface import implementer

from twistmail.errors import StorageError
from twistmail.interfaces import IRelayQueue
from twistmail.relay.queue import (
    QUEUED,
    SENT,
    QueuedSource,
    QueueEntry,
    QueueError,
    Recipient,
    canonicalLines,
    newQueueId,
    validId,
)
from twistmail.storage.postgresql.schema import CHUNK

log = Logger()

_NOW = "extract(epoch from clock_timestamp())"
HEADER_LIMIT = 64 * 1024


class QueueIdTaken(StorageError):
    """L{PostgresRelayQueue.enqueue} was given an id another message has."""


class QueueClaimed(QueueError):
    """Another node holds the message (its lease has not run out)."""


def _rechunked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The bytes in pieces of exactly L{CHUNK} octets (the last one shorter)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= CHUNK:
            yield bytes(buffer[:CHUNK])
            del buffer[:CHUNK]
    if buffer:
        yield bytes(buffer)


def _row(entry: QueueEntry) -> tuple:
    return (entry.toJSON().decode(), entry.created, entry.lane(), entry.nextAttempt())


def _entry(data: str, id: str) -> QueueEntry:
    return QueueEntry.fromJSON(data, f"relay_queue {id}")


# -- transactions: f(conn, ...) in a worker thread -------------------------------------


def insert(conn, entry: QueueEntry, chunks: Callable[[], Iterable[bytes]], fixedId: bool) -> None:
    for _ in range(10):
        if conn.execute("INSERT INTO relay_queue (id, entry, created, lane, next_due) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
                        (entry.id, *_row(entry))).fetchone():
            break
        if fixedId:
            raise QueueIdTaken(f"queue id {entry.id} is taken")
        entry.id = newQueueId(entry.created)
    else:
        raise StorageError("cannot find a free queue id")
    size = 0
    for seq, data in enumerate(_rechunked(canonicalLines(chunks()))):
        conn.execute("INSERT INTO relay_chunks VALUES (%s, %s, %s)", (entry.id, seq, data))
        size += len(data)
    entry.size = size
    conn.execute("UPDATE relay_queue SET entry = %s WHERE id = %s",
                 (entry.toJSON().decode(), entry.id))


def readEntry(conn, id: str) -> QueueEntry:
    row = conn.execute("SELECT entry::text FROM relay_queue WHERE id = %s",
                       (validId(id),)).fetchone()
    if row is None:
        raise QueueError(f"no queue entry {id} (see: twistmail queue list)")
    return _entry(row[0], id)


def chunksOf(conn, id: str) -> Iterator[bytes]:
    """The message, one chunk per query (only one chunk in memory at a time)."""
    seq = 0
    while row := conn.execute("SELECT data FROM relay_chunks WHERE queue_id = %s AND seq = %s",
                              (id, seq)).fetchone():
        yield bytes(row[0])
        seq += 1


def claim(conn, id: str, node: str, lease: float, spoolDir: str) -> tuple[QueueEntry, str]:
    """Take the message for C{node} and copy it to a spool file: (entry, its path)."""
    row = conn.execute(f"SELECT entry::text FROM relay_queue WHERE id = %s AND (claimed_by IS NULL "
                       f"OR claimed_by = %s OR lease_until < {_NOW}) FOR UPDATE SKIP LOCKED",
                       (validId(id), node)).fetchone()
    if row is None:
        holder = conn.execute("SELECT claimed_by FROM relay_queue WHERE id = %s",
                              (id,)).fetchone()
        if holder is None:
            raise QueueError(f"no queue entry {id} (see: twistmail queue list)")
        raise QueueClaimed(f"{id} is being delivered by {holder[0] or 'another node'}")
    conn.execute(f"UPDATE relay_queue SET claimed_by = %s, lease_until = {_NOW} + %s "
                 "WHERE id = %s", (node, lease, id))
    os.makedirs(spoolDir, mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=id + ".", suffix=".eml", dir=spoolDir)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunksOf(conn, id):
                f.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return _entry(row[0], id), path


def store(conn, entry: QueueEntry, node: str | None) -> None:
    """Write the entry's state; with C{node}, only if that node still holds it, and end
    its claim; without (the admin CLI), only if no node holds it."""
    data, _, lane, due = _row(entry)
    if node is None:
        done = conn.execute(f"UPDATE relay_queue SET entry = %s, lane = %s, next_due = %s "
                            f"WHERE id = %s AND (claimed_by IS NULL OR lease_until < {_NOW}) "
                            "RETURNING id", (data, lane, due, entry.id)).fetchone()
    else:
        done = conn.execute("UPDATE relay_queue SET entry = %s, lane = %s, next_due = %s, "
                            "claimed_by = NULL, lease_until = NULL WHERE id = %s AND "
                            "claimed_by = %s RETURNING id",
                            (data, lane, due, entry.id, node)).fetchone()
    if done is None:
        raise QueueError(f"queue entry {entry.id} was removed or taken over by another node "
                         "(its lease ran out)")


def markSent(conn, id: str, node: str, sent: list, when: float) -> None:
    """Recipients of a message C{node} holds were delivered (the attempt goes on)."""
    row = conn.execute("SELECT entry::text FROM relay_queue WHERE id = %s AND claimed_by = %s "
                       "FOR UPDATE", (id, node)).fetchone()
    if row is None:
        raise QueueError(f"queue entry {id} was removed or taken over by another node")
    entry = _entry(row[0], id)
    replies = {address: (reply, host) for address, reply, host in sent}
    for r in entry.recipients:
        if r.address in replies and r.state == QUEUED:
            r.state, r.attempts, r.last_attempt = SENT, r.attempts + 1, when
            r.last_reply, r.remote_host = replies[r.address]
    data, _, lane, due = _row(entry)
    conn.execute("UPDATE relay_queue SET entry = %s, next_due = %s WHERE id = %s",
                 (data, due, id))


def release(conn, id: str, node: str) -> None:
    conn.execute("UPDATE relay_queue SET claimed_by = NULL, lease_until = NULL "
                 "WHERE id = %s AND claimed_by = %s", (id, node))


def delete(conn, id: str) -> None:
    conn.execute("DELETE FROM relay_queue WHERE id = %s", (validId(id),))


def renew(conn, ids: list[str], node: str, lease: float) -> None:
    conn.execute(f"UPDATE relay_queue SET lease_until = {_NOW} + %s "
                 "WHERE id = ANY(%s) AND claimed_by = %s", (lease, ids, node))


def headers(conn, id: str) -> bytes:
    head = b""
    for chunk in chunksOf(conn, validId(id)):
        head += chunk
        if b"\r\n\r\n" in head or len(head) >= HEADER_LIMIT:
            break
    head = head[:HEADER_LIMIT]
    end = head.find(b"\r\n\r\n")
    return head[:end + 2] if end >= 0 else head


def whole(conn, id: str) -> bytes:
    return b"".join(chunksOf(conn, validId(id)))


def spoolTemporary(conn, id: str):
    """An anonymous temporary file holding the message, at its start."""
    f = tempfile.TemporaryFile()
    for chunk in chunksOf(conn, validId(id)):
        f.write(chunk)
    f.seek(0)
    return f


def due(conn, until: float | None) -> list[tuple[str, float, str]]:
    """(id, next due, lane) of messages with work left; with C{until}, only those due by
    then that no live lease holds."""
    if until is None:
        return conn.execute("SELECT id, next_due, lane FROM relay_queue "
                            "WHERE next_due IS NOT NULL").fetchall()
    return conn.execute(f"SELECT id, next_due, lane FROM relay_queue WHERE next_due <= %s AND "
                        f"(claimed_by IS NULL OR lease_until < {_NOW}) ORDER BY next_due "
                        "LIMIT 10000", (until,)).fetchall()


def allEntries(conn) -> list[QueueEntry]:
    rows = conn.execute("SELECT id, entry::text FROM relay_queue ORDER BY created, id").fetchall()
    return [_entry(data, id) for id, data in rows]


def configuredStore(config):
    """The L{PostgresStore} of ``[storage.postgresql]``, for the queue alone (the mail
    may be in another backend).  @raise ConfigError: naming the file, key and fix."""
    from twistmail.config import ConfigError
    from twistmail.storage.postgresql import PostgresStoreFactory

    try:
        return PostgresStoreFactory().makeStore(config.backendOptions.get("postgresql", {}),
                                                config.dataDir)
    except ConfigError as e:
        raise ConfigError(f'{config.path}: [relay] queue = "postgresql" needs the database: '
                          f"{e}") from None


class Database:
    """C{transaction} on a connection of its own, in the calling thread, firing at once:
    the admin CLI's access to the shared queue (its Deferreds have fired on return)."""

    def __init__(self, dsn: str, connectTimeout: float = 10) -> None:
        self.dsn = dsn
        self._timeout = connectTimeout

    def transaction(self, f, *args) -> defer.Deferred:
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=max(1, int(self._timeout))) as conn:
                with conn.transaction():
                    return defer.succeed(f(conn, *args))
        except psycopg.Error as e:
            return defer.fail(StorageError(f"database error: {type(e).__name__}: {e}".strip()))
        except Exception:
            return defer.fail()


# -- the reactor-side API ---------------------------------------------------------


@implementer(IRelayQueue)
class PostgresRelayQueue(service.Service):
    """The shared queue; a service so that its poll and lease timers run with the server.

    @param db: a L{twistmail.storage.postgresql.PostgresStore} (its pool and workers).
    @param lease: seconds a claim lasts without renewal (``queue_lease_time``).
    @param pollInterval: seconds between looks for messages nobody holds.
    """

    name = "relay queue (postgresql)"

    def __init__(self, db, dataDir: str, lease: float = 300, pollInterval: float = 1,
                 clock=None, node: str | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.path = os.path.join(dataDir, "queue")
        self._spoolDir = os.path.join(self.path, "spool")
        self._db = db
        self._lease = lease
        self._clock = clock
        self.node = node or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._listeners: list[Callable[[QueueEntry], None]] = []
        self._watchers: list[Callable] = []
        self._spools: dict[str, str] = {}  # id -> spool file, while this node holds it
        self._unwritten: dict[str, tuple] = {}  # id -> (f, args): a save or removal that failed
        self._polling = False
        self._loops = [task.LoopingCall(self._poll), task.LoopingCall(self._renew)]
        self._intervals = [pollInterval, lease / 3]
        for loop in self._loops:
            loop.clock = clock

    def startService(self) -> None:
        super().startService()
        # Left by a crash (once, at start: this process is the data directory's only server).
        shutil.rmtree(self._spoolDir, ignore_errors=True)
        for loop, interval in zip(self._loops, self._intervals, strict=True):
            loop.start(interval, now=False)

    def stopService(self):
        for loop in self._loops:
            if loop.running:
                loop.stop()
        return super().stopService()

    def _poll(self) -> None:
        if self._polling or not self._watchers:
            return
        self._polling = True

        def found(rows) -> None:
            for watcher in list(self._watchers):
                watcher(rows)

        def failed(f) -> None:
            f.trap(StorageError)
            log.warn("relay queue: cannot poll the database: {why}", why=f.getErrorMessage())

        d = self._db.transaction(due, self._clock.seconds())
        d.addCallbacks(found, failed)
        d.addBoth(lambda _: setattr(self, "_polling", False))

    def _renew(self):
        if not self._spools:
            return None

        def failed(f) -> None:
            f.trap(StorageError)
            log.warn("relay queue: cannot renew leases: {why}", why=f.getErrorMessage())

        return self._db.transaction(renew, list(self._spools), self.node,
                                    self._lease).addErrback(failed)

    # -- IRelayQueue --------------------------------------------------------------

    def addListener(self, listener: Callable[[QueueEntry], None]) -> None:
        self._listeners.append(listener)

    def watch(self, found: Callable) -> None:
        self._watchers.append(found)

    def enqueue(self, sender: str, recipients: Iterable[str],
                chunks: Callable[[], Iterable[bytes]], *, origin: str, id: str | None = None,
                client: str = "", helo: str = "", extra: dict | None = None) -> defer.Deferred:
        now = self._clock.seconds()
        entry = QueueEntry(id=id or newQueueId(now), sender=sender,
                           recipients=[Recipient(r) for r in recipients], created=now,
                           origin=origin, client=client, helo=helo, extra=dict(extra or {}))

        def committed(ignored) -> QueueEntry:
            for listener in list(self._listeners):
                listener(entry)
            return entry

        return self._db.transaction(insert, entry, chunks, id is not None).addCallback(committed)

    def load(self, id: str) -> defer.Deferred:
        return self._db.transaction(readEntry, id)

    def loadWithMessage(self, id: str) -> defer.Deferred:
        def claimed(result):
            entry, path = result
            self._dropSpool(id)
            self._spools[id] = path
            return entry, open(path, "rb")

        def claim_(ignored):
            return self._db.transaction(claim, id, self.node, self._lease, self._spoolDir)

        return self._replay(id).addCallback(claim_).addCallback(claimed)

    def _replay(self, id: str) -> defer.Deferred:
        """Write first what an outage kept us from writing after the last attempt (its
        save or removal): else the attempt would send again to recipients it reached."""
        unwritten = self._unwritten.pop(id, None)
        if unwritten is None:
            return defer.succeed(None)
        f, args = unwritten

        def failed(failure):
            if failure.check(StorageError) and not failure.check(QueueError):
                self._unwritten.setdefault(id, unwritten)
            return failure

        return self._db.transaction(f, *args).addErrback(failed)

    def _write(self, id: str, f, *args) -> defer.Deferred:
        """C{f(conn, *args)}, kept for L{_replay} if the database fails meanwhile."""
        self._unwritten.pop(id, None)

        def failed(failure):
            if failure.check(StorageError) and not failure.check(QueueError):
                self._unwritten[id] = (f, args)
            return failure

        return self._db.transaction(f, *args).addErrback(failed).addBoth(self._ended, id)

    def _dropSpool(self, id: str) -> None:
        path = self._spools.pop(id, None)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _ended(self, result, id: str):
        self._dropSpool(id)
        return result

    def save(self, entry: QueueEntry) -> defer.Deferred:
        held = entry.id in self._spools
        return self._write(entry.id, store, entry, self.node if held else None)

    def recordSent(self, id: str, sent: list) -> defer.Deferred:
        return self._db.transaction(markSent, id, self.node, sent, self._clock.seconds())

    def release(self, id: str) -> defer.Deferred:
        if id not in self._spools:
            return defer.succeed(None)
        return self._db.transaction(release, id, self.node).addBoth(self._ended, id)

    def remove(self, id: str) -> defer.Deferred:
        return self._write(id, delete, id)

    def headers(self, id: str) -> defer.Deferred:
        return self._db.transaction(headers, id)

    def message(self, id: str) -> defer.Deferred:
        return self._db.transaction(whole, id)

    def openMessage(self, id: str) -> defer.Deferred:
        path = self._spools.get(id)
        if path is not None:
            return threads.deferToThread(open, path, "rb")
        return self._db.transaction(spoolTemporary, id)

    def source(self, id: str) -> QueuedSource:
        """The spool file of a message this node holds (the runner's local deliveries)."""
        return QueuedSource(self._spools[id])

    def run(self, f: Callable, *args) -> defer.Deferred:
        return threads.deferToThread(f, *args)

    def scan(self) -> defer.Deferred:
        return self._db.transaction(due, None)

    def entries(self) -> defer.Deferred:
        return self._db.transaction(allEntries)
