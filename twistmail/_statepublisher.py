# -*- test-case-name: tests.test_ratelimit,tests.test_antispam_greylist -*-
"""An in-memory table kept in a JSON file under ``<data_dir>/state/``, written in batches.

The table changes on the reactor thread with every SMTP transaction; writing
the file each time would put an fsync in every transaction.  Instead the
publisher writes every few seconds when something changed, and at stop, off
the reactor thread and atomically (temp + fsync + rename), and reads the file
back at start so a restart keeps the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Protocol

from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistmail._fsutil import atomicWrite

log = Logger()


class PublishedState(Protocol):
    """What a table offers its publisher (all called on the reactor thread)."""

    #: something changed since the last capture
    changed: bool

    def capture(self) -> Callable[[], dict]:
        """Copy what changed; the result builds the file's content in another thread."""

    def recapture(self) -> None:
        """The last capture was lost (its write failed): copy everything next time."""

    def restore(self, data: dict) -> None:
        """Take back what an earlier run wrote."""


def writeState(path: str, build: Callable[[], dict]) -> None:
    """In a thread: build, encode and replace the file (temp + fsync + rename)."""
    data = json.dumps(build(), separators=(",", ":")).encode()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    atomicWrite(path, data)


class StatePublisher(service.Service):
    """Reads C{state} back at start; writes it every C{interval} seconds when it changed,
    and at stop."""

    def __init__(self, state: PublishedState, path: str, read: Callable[[str], dict],
                 clock: IReactorTime, inThread: Callable[..., Deferred], interval: float,
                 label: str) -> None:
        """@param read: the file's content ({} if there is none); raises OSError or
            ValueError for a file it cannot use.
        @param inThread: C{deferToThread}-like: runs C{f(*args)} off the reactor thread.
        @param label: what the state is, for log lines ("ratelimit").
        """
        self.state = state
        self.path = path
        self._read = read
        self._inThread = inThread
        self._loop = task.LoopingCall(self._save)
        self._loop.clock = clock
        self._interval = interval
        self._label = label
        self._writing = None

    def startService(self) -> None:
        super().startService()
        # Read before any listener starts (makeService adds this service before them).
        try:
            self.state.restore(self._read(self.path))
        except (OSError, ValueError) as e:
            log.warn("{label} state {path} not read, starting empty: {error}",
                     label=self._label, path=self.path, error=str(e))
        self._loop.start(self._interval, now=False)

    def _save(self) -> Deferred | None:
        if self._writing is not None or not self.state.changed:
            return None
        d = self._writing = self._inThread(writeState, self.path, self.state.capture())

        def failed(failure) -> None:
            self.state.recapture()  # try again next time
            log.failure("{label} state {path} not written", failure, label=self._label,
                        path=self.path)

        def done(ignored) -> None:
            self._writing = None

        d.addErrback(failed)
        d.addBoth(done)
        return d

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        pending = self._writing
        if pending is None:
            return self._save()
        return pending.addCallback(lambda ignored: self._save())
