# -*- test-case-name: tests.test_relay_queue -*-
"""RelayQueue: mail waiting for delivery, in ``<data_dir>/queue/``.

One message is two files::

    <id>.eml    the message, CRLF line endings, written once
    <id>.json   the envelope and per-recipient state (versioned JSON, never pickle)

Enqueueing writes ``<id>.eml`` and ``<id>.json.tmp``, syncs both, renames the
json into place and syncs the directory: **the json rename is the commit
point**.  An ``.eml`` without its ``.json`` is what a crash between the two
renames leaves; ``scan`` removes it (and stray ``.tmp`` files) at start.
Writers hold a shared flock on ``queue/.lock`` from the first write to the
rename, the cleanup an exclusive one, so it never takes a message that
``twistmail sendmail`` is committing at that moment.

Updates replace the json atomically; removal unlinks the json first (the
message is gone) and then the eml.  Syncs are shared between concurrent
operations (``twistmail._groupcommit``).  Message bodies are not read into
memory here, except small ones for delivery (``readForDelivery``, at most
16 KiB each, one per message being worked on); the runner streams the rest
from ``<id>.eml``.
"""

from __future__ import annotations

import fcntl
import io
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from twistmail import _fsutil
from twistmail._batchcalls import BatchedCalls
from twistmail._groupcommit import GroupCommit, NewFile, Removed, commitBatch, writeNewFile
from twistmail.errors import StorageError
from twistmail.interfaces import IRelayQueue
from twistmail.relay.fairness import laneKey

log = Logger()

FORMAT = "twistmail-queue"
VERSION = 1

QUEUED, SENT, FAILED = "queued", "sent", "failed"

_ID = re.compile(r"^[0-9A-Za-z]{1,64}$")
_counter = itertools.count()


class QueueError(StorageError):
    """A queue file is missing, unreadable or of an unknown version."""


def newQueueId(now: float | None = None) -> str:
    """16 hex digits: microseconds, then 12 random bits (unique across processes;
    a collision fails the exclusive create and the caller picks another id)."""
    micros = int((time.time() if now is None else now) * 1e6)
    return f"{micros:013X}{int.from_bytes(os.urandom(2), 'big') % 4096:03X}"


def idTime(id: str) -> float | None:
    """When the message of C{id} was queued (L{newQueueId}, and SMTP's transaction ids,
    start with it); None for an id of another form."""
    if len(id) != 16:
        return None
    try:
        return int(id[:13], 16) / 1e6
    except ValueError:
        return None


def validId(id: str) -> str:
    if not _ID.match(id or ""):
        raise QueueError(f"{id!r} is not a queue id (see: twistmail queue list)")
    return id


@dataclass
class Recipient:
    address: str
    state: str = QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    last_reply: str = ""  # "451 4.3.0 ..." or a connection error, as the DSN reports it
    remote_host: str = ""  # who gave last_reply (DSN Remote-MTA)


@dataclass
class QueueEntry:
    """The envelope and delivery state of one queued message."""

    id: str
    sender: str  # "" is the null reverse-path: never bounced (RFC 5321 §4.5.5)
    recipients: list[Recipient]
    created: float
    origin: str  # "smtp", "sendmail", "bounce" or "tlsrpt"
    client: str = ""
    helo: str = ""
    size: int = 0
    extra: dict = field(default_factory=dict)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == QUEUED]

    def nextAttempt(self) -> float | None:
        """When the earliest pending recipient is due; None when nothing is pending."""
        return min((r.next_attempt for r in self.pending()), default=None)

    def requiresTLS(self) -> bool:
        """MAIL had REQUIRETLS (RFC 8689): kept in C{extra} with the DSN request, so it
        survives a restart; the relay sends it only over verified TLS to a host that
        offers REQUIRETLS (L{twistmail.relay.sender}), and its reports carry it too."""
        return bool(self.extra.get("requiretls"))

    def tlsOptional(self) -> bool:
        """The message says "TLS-Required: No" (RFC 8689 §3): MTA-STS may be ignored."""
        return bool(self.extra.get("tls_optional")) and not self.requiresTLS()

    def lane(self) -> str:
        """Whose turn this message takes in the runner (L{twistmail.relay.fairness})."""
        return laneKey(self.sender, [r.address for r in self.recipients])

    def toJSON(self) -> bytes:
        document = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(document, indent=1).encode() + b"\n"

    @classmethod
    def fromJSON(cls, data: bytes, where: str) -> QueueEntry:
        try:
            document = json.loads(data)
            if document.pop("format", None) != FORMAT or document.pop("version", None) != VERSION:
                raise QueueError(f"{where}: not a version {VERSION} twistmail queue file")
            document["recipients"] = [Recipient(**r) for r in document["recipients"]]
            return cls(**document)
        except (ValueError, TypeError, KeyError) as e:
            raise QueueError(f"{where}: unreadable queue file ({e})") from None


def canonicalLines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The message with every line ending CRLF, the last line included.

    SMTP transmits CRLF lines (RFC 5321 §2.3.8); sendmail input has LF.  A bare
    LF sent on as is could end DATA early at a lax receiver (SMTP smuggling),
    so the queue stores only canonical lines and the sender only dot-stuffs.
    """
    pendingCR = False
    last = b"\n"
    for chunk in chunks:
        if pendingCR:
            chunk, pendingCR = b"\r" + chunk, False
        if chunk.endswith(b"\r"):
            chunk, pendingCR = chunk[:-1], True
        if chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            last = chunk[-1:]
            yield chunk
    if pendingCR or last != b"\n":
        yield b"\r\n"


class QueuedSource:
    """A queued message as a message source for LocalDelivery (read in a worker thread)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(64 * 1024):
                yield chunk


# -- file operations: blocking, for a worker thread or the admin CLI -------------


def _paths(queueDir: str, id: str) -> tuple[str, str]:
    base = os.path.join(queueDir, validId(id))
    return base + ".eml", base + ".json"


def ensureDir(queueDir: str) -> None:
    if not os.path.isdir(queueDir):
        try:
            os.makedirs(queueDir, mode=0o700, exist_ok=True)
            _fsutil.fsyncDir(os.path.dirname(queueDir))
        except OSError as e:
            raise StorageError(f"cannot create {queueDir}: {e.strerror}") from e


def stageNew(queueDir: str, entry: QueueEntry, chunks: Callable[[], Iterable[bytes]]) -> list:
    """Write the message and the json's temporary file (unsynced; see commitBatch).

    @raise StorageError: its C{__cause__} is FileExistsError if the id is taken.
    """
    ensureDir(queueDir)
    eml, final = _paths(queueDir, entry.id)
    entry.size = writeNewFile(eml, canonicalLines(chunks()))
    try:
        tmp = f"{final}.{os.getpid()}.{next(_counter)}.tmp"
        writeNewFile(tmp, [entry.toJSON()])
    except BaseException:
        os.unlink(eml)
        raise
    return [NewFile(eml, eml), NewFile(tmp, final)]


def stageSave(queueDir: str, entry: QueueEntry) -> list:
    _, final = _paths(queueDir, entry.id)
    if not os.path.exists(final):
        raise QueueError(f"queue entry {entry.id} was removed")
    tmp = f"{final}.{os.getpid()}.{next(_counter)}.tmp"
    writeNewFile(tmp, [entry.toJSON()])
    return [NewFile(tmp, final, replaces=True)]


def stageRemove(queueDir: str, id: str) -> list:
    eml, final = _paths(queueDir, id)
    for path in (final, eml):  # the json first: without it the message is gone
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot remove {path}: {e.strerror}") from e
    return [Removed(final), Removed(eml)]


def readEntry(queueDir: str, id: str) -> QueueEntry:
    _, final = _paths(queueDir, id)
    try:
        data = _readSmall(final, None)
    except FileNotFoundError:
        raise QueueError(f"no queue entry {id} (see: twistmail queue list)") from None
    except OSError as e:
        raise QueueError(f"cannot read {final}: {e.strerror}") from e
    return QueueEntry.fromJSON(data, final)


def _readSmall(path: str, limit: int | None) -> bytes:
    """The file's first C{limit} + 1 octets (all of it for None) with os.open and os.read.

    Python's open() makes seven system calls (fstat, ioctl, lseek...) where three
    do: a worker thread gives the GIL up at each one and waits to get it back,
    and while a queue drains that wait is shared with the reactor thread."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        want = _READ if limit is None else limit + 1
        while want > 0:
            chunk = os.read(fd, want)
            parts.append(chunk)
            if len(chunk) < want:
                break  # a regular file reads short only at its end
            if limit is not None:
                want -= len(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


_READ = 64 * 1024

#: Messages up to this size are read whole with their entry (L{readForDelivery}).
IN_MEMORY = 16 * 1024


def readForDelivery(queueDir: str, id: str) -> tuple[QueueEntry, object]:
    """The entry and its message as a file object (the caller closes it).

    A message of at most L{IN_MEMORY} octets is read here, in the worker
    thread, and given as a BytesIO: reading and closing the file in the
    sender, on the reactor thread, cost ~0.1 ms per message there (cProfile,
    bench/README.rst "Relay queue").  Larger ones are given open, to stream.
    """
    entry = readEntry(queueDir, id)
    eml = _paths(queueDir, id)[0]
    try:
        data = _readSmall(eml, IN_MEMORY)
        if len(data) <= IN_MEMORY:
            return entry, io.BytesIO(data)
        return entry, open(eml, "rb")
    except FileNotFoundError:
        raise QueueError(f"{id}.json has no {id}.eml") from None
    except OSError as e:
        raise QueueError(f"cannot read {id}.eml: {e.strerror}") from e


def readHeaders(queueDir: str, id: str, limit: int = 64 * 1024) -> bytes:
    """The header section of the message (up to C{limit} octets), for DSNs and ``queue show``."""
    eml, _ = _paths(queueDir, id)
    with open(eml, "rb") as f:
        head = f.read(limit)
    end = head.find(b"\r\n\r\n")
    return head[:end + 2] if end >= 0 else head


def readEntries(queueDir: str) -> list[QueueEntry]:
    """Every readable entry, oldest first (one removed meanwhile is left out)."""
    found = []
    for id in listIds(queueDir):
        try:
            found.append(readEntry(queueDir, id))
        except QueueError:
            continue  # removed meanwhile, or for the server to quarantine
    return sorted(found, key=lambda e: (e.created, e.id))


def listIds(queueDir: str) -> list[str]:
    try:
        names = os.listdir(queueDir)
    except FileNotFoundError:
        return []
    return [n[:-5] for n in names if n.endswith(".json") and _ID.match(n[:-5])]


class WriterLock:
    """Shared while committing files, exclusive while cleaning up after a crash."""

    def __init__(self, queueDir: str, exclusive: bool = False) -> None:
        self._path = os.path.join(queueDir, ".lock")
        self._mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH

    def __enter__(self) -> WriterLock:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, self._mode)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)


def commitLocked(queueDir: str, stages: list) -> list:
    """commitBatch under the shared writer lock (see the module docstring)."""
    ensureDir(queueDir)
    with WriterLock(queueDir):
        return commitBatch(stages)


def scanSync(queueDir: str) -> list[tuple[str, float, str]]:
    """Clean up after a crash and list (id, next attempt, lane) of every message with work left.

    Entries whose files are inconsistent are moved to ``queue/corrupt/`` for the
    admin, never deleted.
    """
    ensureDir(queueDir)
    with WriterLock(queueDir, exclusive=True):
        names = set(os.listdir(queueDir))
        for name in names:
            if name.endswith(".tmp") or (name.endswith(".eml") and name[:-4] + ".json" not in names):
                log.info("queue: removing {name}, left by an interrupted write", name=name)
                _unlinkQuietly(os.path.join(queueDir, name))
    found = []
    for id in listIds(queueDir):
        try:
            if not os.path.exists(os.path.join(queueDir, id + ".eml")):
                raise QueueError(f"{id}.json has no {id}.eml")
            entry = readEntry(queueDir, id)
        except QueueError as e:
            _quarantine(queueDir, id, str(e))
            continue
        due = entry.nextAttempt()
        found.append((id, due if due is not None else 0.0, entry.lane()))
    return found


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _quarantine(queueDir: str, id: str, why: str) -> None:
    corrupt = os.path.join(queueDir, "corrupt")
    os.makedirs(corrupt, mode=0o700, exist_ok=True)
    for suffix in (".json", ".eml"):
        try:
            os.rename(os.path.join(queueDir, id + suffix), os.path.join(corrupt, id + suffix))
        except FileNotFoundError:
            pass
    log.error("queue: {why}; moved to {corrupt}", why=why, corrupt=corrupt)


# -- the reactor-side API -----------------------------------------------------------


@implementer(IRelayQueue)
class RelayQueue:
    """The queue as the server uses it: every method returns a Deferred and blocks no one."""

    def __init__(self, dataDir: str, run=threads.deferToThread,
                 clock: Callable[[], float] = time.time) -> None:
        """@param run: C{run(f, *args) -> Deferred}, running f off the reactor thread."""
        self.path = os.path.join(dataDir, "queue")
        self._run = run
        self._clock = clock
        self._commit = GroupCommit(lambda f, stages: run(commitLocked, self.path, stages))
        # One worker thread call per message costs the reactor thread as much as the
        # read; under load these share them (twistmail._batchcalls).  Two batches of
        # each at once, not four: a draining queue then wakes fewer threads for
        # bigger batches, and they take the GIL from the reactor thread less often
        # (bench/relay_drain.py, 6,000 messages: 0.69-0.77 -> 0.56-0.58 ms of server
        # CPU a message, the drain 10-15% faster); two still overlap on a cold disk.
        self._readForDelivery = BatchedCalls(run, lambda id: readForDelivery(self.path, id),
                                             parallel=2)
        self._unlink = BatchedCalls(run, lambda id: stageRemove(self.path, id), parallel=2)
        self._listeners: list[Callable[[QueueEntry], None]] = []

    def addListener(self, listener: Callable[[QueueEntry], None]) -> None:
        """Call C{listener(entry)} after each message this object enqueued is durable."""
        self._listeners.append(listener)

    def watch(self, found: Callable) -> None:
        """One node's queue: only this process and ``twistmail sendmail`` (which tells the
        server through L{twistmail.relay.control}) add to it."""

    def release(self, id: str) -> defer.Deferred:
        return defer.succeed(None)

    def recordSent(self, id: str, sent: list) -> defer.Deferred:
        """Nothing yet: one node works its own queue; L{save} after the attempt records it."""
        return defer.succeed(None)

    def source(self, id: str) -> QueuedSource:
        return QueuedSource(self.messagePath(id))

    def entries(self) -> defer.Deferred:
        return self._run(readEntries, self.path)

    def messagePath(self, id: str) -> str:
        return _paths(self.path, id)[0]

    def enqueue(self, sender: str, recipients: Iterable[str],
                chunks: Callable[[], Iterable[bytes]], *, origin: str, id: str | None = None,
                client: str = "", helo: str = "", extra: dict | None = None) -> defer.Deferred:
        """Store a message durably (fsynced before the Deferred fires).

        @param chunks: called in a worker thread; returns the message bytes.
        @param extra: kept with the envelope (L{QueueEntry.extra}): the DSN request...
        @return: Deferred firing with the L{QueueEntry}; StorageError on failure.
        """
        now = self._clock()
        entry = QueueEntry(id=id or newQueueId(now), sender=sender,
                           recipients=[Recipient(r) for r in recipients], created=now,
                           origin=origin, client=client, helo=helo, extra=dict(extra or {}))

        def stage() -> list:
            for _ in range(10):
                try:
                    return stageNew(self.path, entry, chunks)
                except StorageError as e:
                    if id is not None or not isinstance(e.__cause__, FileExistsError):
                        raise
                    entry.id = newQueueId(now)  # ours were taken: another one
            raise StorageError("cannot find a free queue id")

        d = self._commit.submit(stage)

        def committed(ignored) -> QueueEntry:
            for listener in list(self._listeners):
                listener(entry)
            return entry

        return d.addCallback(committed)

    def load(self, id: str) -> defer.Deferred:
        return self._run(readEntry, self.path, id)

    def loadWithMessage(self, id: str) -> defer.Deferred:
        """(entry, message file) in one worker-thread call (L{readForDelivery}): what an
        attempt needs; messages due together share the call."""
        return self._readForDelivery(id)

    def save(self, entry: QueueEntry) -> defer.Deferred:
        return self._commit.submit(lambda: stageSave(self.path, entry))

    def remove(self, id: str) -> defer.Deferred:
        """Unlink the files in the thread pool, then sync the directory in a group commit.

        Not both in the commit: its thread works one batch at a time, and while the
        reactor thread is busy (a queue draining), a thread takes up to a GIL switch
        interval (5 ms) to get the GIL back after each system call: 128 removals,
        256 unlinks, took 0.1-0.9 s there and held up the runner (bench/README.rst,
        "Relay queue").  Threads of the pool waiting together hand the GIL on to
        each other instead; removals that wait share a thread call.
        """
        return self._unlink(id).addCallback(lambda removed: self._commit.submit(lambda: removed))

    def headers(self, id: str) -> defer.Deferred:
        return self._run(readHeaders, self.path, id)

    def run(self, f: Callable, *args) -> defer.Deferred:
        """C{f(*args)} off the reactor thread (for blocking reads of a message)."""
        return self._run(f, *args)

    def message(self, id: str) -> defer.Deferred:
        """The whole message (for RET=FULL reports: only small ones are read)."""
        def read() -> bytes:
            with open(self.messagePath(id), "rb") as f:
                return f.read()
        return self._run(read)

    def openMessage(self, id: str) -> defer.Deferred:
        return self._run(open, self.messagePath(id), "rb")

    def scan(self) -> defer.Deferred:
        """Deferred firing with [(id, next attempt, lane)] for every committed message."""
        return self._run(scanSync, self.path)
