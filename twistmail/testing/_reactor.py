"""A reactor running in a background thread, for tests written as plain blocking code.

Tests call into the reactor with ``onReactor(f, ...)`` (blockingCallFromThread)
and talk to listeners with real blocking clients from the test thread.
"""

from __future__ import annotations

import threading

_started = threading.Event()


def startReactor() -> None:
    """Run the global reactor in a daemon thread (once per process)."""
    from twisted.internet import reactor

    if _started.is_set():
        return
    thread = threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True, name="reactor")
    reactor.callWhenRunning(_started.set)
    reactor.callWhenRunning(_reapChildren, reactor)
    thread.start()
    if not _started.wait(10):
        raise RuntimeError("reactor did not start")


def onReactor(f, *args, **kwargs):
    """Run f on the reactor thread and wait for its (possibly Deferred) result."""
    from twisted.internet import reactor, threads

    startReactor()
    return threads.blockingCallFromThread(reactor, f, *args, **kwargs)


def _reapChildren(reactor) -> None:
    """Outside the main thread the reactor gets no SIGCHLD, so a child process that
    exits after its pipes closed would never be reaped (nor its protocol told)."""
    from twisted.internet import task
    from twisted.internet.process import reapAllProcesses

    task.LoopingCall(reapAllProcesses).start(0.1, now=False)
