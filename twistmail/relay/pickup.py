# -*- test-case-name: tests.test_queue_cli -*-
"""The server's side of ``twistmail.relay.control``: act on the CLI's request files."""

from __future__ import annotations

from twisted.application import internet
from twisted.internet import defer, threads
from twisted.logger import Logger

from twistmail.relay.control import ALL, STALE, listRequests, removeRequests
from twistmail.relay.queue import QueueError, validId

log = Logger()


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
            elif action == "delete":
                # Answer (remove the request) once the message is gone (a queue in
                # PostgreSQL has no files here: the queue, not C{exists}, knows).
                waits.append(self._runner.delete(id))
            done.append(name)
        d = defer.DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: done and self._run(removeRequests, self._queueDir, done))
