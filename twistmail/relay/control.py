# -*- test-case-name: tests.test_queue_cli -*-
"""How ``twistmail sendmail`` and ``twistmail queue`` reach the running server.

Through files, so the CLI works the same whether the server runs or not and
needs no socket or credentials: it writes request files into
``<data_dir>/queue/control/``, named ``<id>.new`` (sendmail queued a
message), ``<id>.flush``, ``all.flush`` and ``<id>.delete``.  The server
looks at that directory every ``[relay] pickup_interval`` seconds
(``twistmail.relay.pickup``), acts, and removes each file it handled; the
CLI waits for that to confirm.

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

from twistmail.relay.queue import validId

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
