# -*- test-case-name: tests.test_queue_cli -*-
"""How ``twistmail sendmail`` and ``twistmail queue`` reach the running server.

Through files, so the CLI works the same whether the server runs or not and
needs no socket or credentials: it writes request files into
``<data_dir>/queue/control/``, named ``<id>.new`` (sendmail queued a
message), ``<id>.flush``, ``all.flush`` and ``<id>.delete``.  The server
looks at that directory every ``[relay] pickup_interval`` seconds, acts,
and removes each file it handled; the CLI waits for that to confirm.

A ``.new`` request is written *before* the message is committed, so a
sendmail killed halfway never leaves a committed message the server does
not know about; the server keeps a request whose message is not there yet
and drops it after an hour.  If the server is not running, the CLI holds
the server's lock (``twistmail.lock``) and changes the queue files itself;
mail from sendmail then waits in the queue for the next start.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.application import internet
from twisted.internet import defer, threads
from twisted.logger import Logger

from twistmail.relay.queue import QueueError, validId

log = Logger()

CONTROL = "control"
ACTIONS = ("new", "flush", "delete")
ALL = "all"
#: A .new request whose message never appeared: its writer died.
STALE = 3600.0
LOCK = "twistmail.lock"


def controlDir(queueDir: str) -> str:
    return os.path.join(queueDir, CONTROL)


def requestPath(queueDir: str, id: str, action: str) -> str:
    assert action in ACTIONS
    return os.path.join(controlDir(queueDir), f"{id if id == ALL else validId(id)}.{action}")


def writeRequest(queueDir: str, id: str, action: str) -> str:
    """Create the request file (no fsync: after a crash the server rescans the queue anyway)."""
    path = requestPath(queueDir, id, action)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "wb"):
        pass
    return path


def waitHandled(path: str, timeout: float) -> bool:
    """True once the server removed the request file; False after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def serverStopped(dataDir: str) -> Iterator[bool]:
    """Yields True, holding the server's lock, if no server runs on C{dataDir}; else False."""
    path = os.path.join(dataDir, LOCK)
    if not os.path.isdir(dataDir):
        yield True
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def listRequests(queueDir: str) -> list[tuple[str, str, float, bool]]:
    """(id, action, age in seconds, whether the message's json exists), oldest first."""
    directory = controlDir(queueDir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    now = time.time()
    for name in names:
        id, _, action = name.rpartition(".")
        if action not in ACTIONS:
            continue
        try:
            age = now - os.stat(os.path.join(directory, name)).st_mtime
        except FileNotFoundError:
            continue
        found.append((id, action, age, os.path.exists(os.path.join(queueDir, id + ".json"))))
    return sorted(found, key=lambda r: -r[2])


def removeRequests(queueDir: str, names: list[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(controlDir(queueDir), name))
        except FileNotFoundError:
            pass


class ControlPoller(internet.TimerService):
    """Server side: every C{interval} seconds, act on the CLI's requests."""

    name = "relay control"

    def __init__(self, runner, queueDir: str, interval: float, run=threads.deferToThread,
                 clock=None) -> None:
        super().__init__(interval, self.poll)
        if clock is not None:
            self.clock = clock
        self._runner = runner
        self._queueDir = queueDir
        self._run = run

    def poll(self):
        return self._run(listRequests, self._queueDir).addCallback(self._act).addErrback(
            lambda f: log.failure("relay control poll", f))

    def _act(self, requests) -> defer.Deferred:
        done, waits = [], []
        for id, action, age, exists in requests:
            name = f"{id}.{action}"
            if id != ALL:
                try:
                    validId(id)
                except QueueError:
                    done.append(name)
                    continue
            if action == "new":
                if exists:
                    self._runner.add(id)
                elif age < STALE:
                    continue  # sendmail is still committing it
            elif action == "flush":
                self._runner.flush(None if id == ALL else id)
                log.info("relay: flush {id} requested by the admin", id=id)
            elif action == "delete" and exists:
                # Answer (remove the request) once the files are gone.
                waits.append(self._runner.delete(id))
            done.append(name)
        d = defer.DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: done and self._run(removeRequests, self._queueDir, done))
