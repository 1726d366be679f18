"""Changes made by other nodes, pushed by PostgreSQL LISTEN/NOTIFY.

A node that committed a change to folders sends one C{pg_notify} whose payload
names them, I{after} the commit, in autocommit on the connection it just used.
Not inside the writing transaction and not from a trigger: PostgreSQL takes a
cluster-wide lock at the commit of every transaction that notified, so that
serialises every write of every node (a previous attempt measured half the
delivery rate).  The price: a node that dies between its commit and its notify
leaves the others to learn of that change from the slow poll
(L{store.FALLBACK_INTERVAL}).

Each node listens on one dedicated connection, in a thread of its own (psycopg's
blocking C{notifies()} never runs on the reactor).  When that connection breaks
(PostgreSQL restarted) the thread reconnects by itself, with a growing pause;
each time it is listening again it tells the store, which refreshes every watched
folder once: notifications sent meanwhile were lost.

Payload: C{<node>:<folder id>,<folder id>...}; a node ignores its own (it has
already refreshed).  The channel is named after the schema, so stores in several
schemas of one database never hear each other (folder ids are per schema).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

from twisted.logger import Logger

log = Logger()

#: The longest a payload may be (PostgreSQL's limit is 8000 bytes).
MAX_PAYLOAD = 7900
#: Seconds the listening thread waits for a notification before it checks whether to stop.
WAKE_INTERVAL = 0.5
#: Seconds between attempts to reconnect: the first, and the most.
RETRY_FIRST, RETRY_MOST = 0.2, 5.0


def channelQuery() -> str:
    """The SQL that names this connection's channel (one per schema)."""
    return "SELECT 'twistmail.' || current_schema()"


def payloads(node: str, folderIds: Iterable[int]) -> list[str]:
    """C{folderIds} as few payloads as fit PostgreSQL's limit."""
    out: list[str] = []
    current = ""
    for folderId in sorted(set(folderIds)):
        item = str(folderId)
        if current and len(node) + 1 + len(current) + 1 + len(item) > MAX_PAYLOAD:
            out.append(f"{node}:{current}")
            current = ""
        current = f"{current},{item}" if current else item
    if current:
        out.append(f"{node}:{current}")
    return out


def parsePayload(node: str, payload: str) -> list[int]:
    """The folder ids another node announced; [] for our own or a malformed payload."""
    sender, _, ids = payload.partition(":")
    if sender == node:
        return []
    try:
        return [int(i) for i in ids.split(",") if i]
    except ValueError:
        return []


def notify(conn, channel: str, node: str, folderIds: Iterable[int]) -> None:
    """Announce C{folderIds} on C{conn}, which must be outside a transaction (autocommit
    off but idle: each statement below is then its own short transaction)."""
    for payload in payloads(node, folderIds):
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    conn.commit()


def newNodeToken() -> str:
    """A name for this node's notifications: unique per store, short."""
    return os.urandom(6).hex()


class Listener:
    """The listening connection's thread.

    @param connect: opens a psycopg connection (in the thread).
    @param node: this node's token (its own notifications are ignored).
    @param onChanged: called (from the thread) with the folder ids another node changed.
    @param onListening: called (from the thread) with the channel each time LISTEN took
        effect, after a (re)connection.
    @param onLost: called (from the thread) when the connection broke.
    """

    def __init__(self, connect: Callable, node: str, onChanged: Callable[[list[int]], None],
                 onListening: Callable[[str], None], onLost: Callable[[], None]) -> None:
        self._connect = connect
        self._node = node
        self._onChanged = onChanged
        self._onListening = onListening
        self._onLost = onLost
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postgresql-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2 * WAKE_INTERVAL + 1) -> None:
        """Ask the thread to end and wait for it (it checks every WAKE_INTERVAL)."""
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        retry = RETRY_FIRST
        while not self._stopping.is_set():
            try:
                self._listen()
                retry = RETRY_FIRST
            except Exception as e:  # connection refused or broken: PostgreSQL restarts
                log.warn("listening for other nodes' changes failed ({error}); retrying "
                         "in {retry:.1f}s", error=f"{type(e).__name__}: {e}".strip(),
                         retry=retry)
                self._onLost()
                self._stopping.wait(retry)
                retry = min(retry * 2, RETRY_MOST)

    def _listen(self) -> None:
        from psycopg import sql

        with self._connect() as conn:
            conn.autocommit = True
            channel = conn.execute(channelQuery()).fetchone()[0]
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._onListening(channel)
            while not self._stopping.is_set():
                for n in conn.notifies(timeout=WAKE_INTERVAL):
                    ids = parsePayload(self._node, n.payload)
                    if ids:
                        self._onChanged(ids)
