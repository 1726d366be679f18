# -*- test-case-name: tests.test_dkimsign -*-
"""The ``dkim-sign`` filter: sign submitted mail at the end of DATA.

Meant to run last on submission (after Message-ID and Date are added), so the
signature covers the message as it leaves.  It signs only for a client that
authenticated or came in on the submission port: an unauthenticated message
on the MX port that claims our From is exactly what must not get our signature.

A message held in memory is signed by a child process (``processes``, one by
default; L{twistmail.filters.dkimprocess}), which reads the same key files,
beside the reactor on another core; one on disk, or any the child could not
sign, in a worker thread.
"""

from __future__ import annotations

import re

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from twistmail._logtext import loggable
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer
from twistmail.filters import dkimprocess
from twistmail.filters.base import Filter
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import Verdict

log = Logger()


def _read(message) -> bytes:
    with message.open() as f:
        return f.read()


#: In a child process: its signer for each data directory (L{signHeaders}).
_childSigners: dict[str, Signer] = {}


def signHeaders(dataDir: str, raw: bytes) -> list[tuple[str, str]]:
    """In the child: L{Signer.headers} with C{dataDir}'s keys (kept, and refreshed as the
    server's are: a new key is used within seconds)."""
    signer = _childSigners.get(dataDir)
    if signer is None:
        signer = _childSigners[dataDir] = Signer(KeyRing(dataDir))
    return signer.headers(raw)


class DKIMSignFilter(Filter):
    name = "dkim-sign"

    def __init__(self, signer: Signer, processes: dkimprocess.DKIMProcesses | None = None,
                 dataDir: str = "") -> None:
        """@param processes: sign messages in memory there, with C{dataDir}'s keys."""
        self._signer = signer
        self._processes = processes
        self._dataDir = dataDir

    def _sign(self, message) -> list:
        return self._signer.headers(_read(message))

    def _fields(self, session, message) -> defer.Deferred:
        """The DKIM-Signature fields: from a child for a message in memory, else (or
        when the child could not) from a worker thread."""
        if self._processes is None or not message.inMemory:
            return self._signer.inThread(self._sign, message)

        def answered(fields):
            if fields == dkimprocess.MISSED:
                return self._signer.inThread(self._sign, message)
            return fields

        def failed(failure):
            log.warn("dkim-sign id={id}: signing process failed ({why}); signing in a thread",
                     id=session.id, why=failure.getErrorMessage())
            return self._signer.inThread(self._sign, message)

        d = self._processes.call(signHeaders, self._dataDir, _read(message))
        return d.addCallbacks(answered, failed)

    def endOfData(self, session, message):
        if session.role != "submission" and not session.authenticated:
            return None

        def signed(fields: list) -> Verdict:
            if fields:
                # RFC 6376 §3.2 tag-list: "tag=value; ..." (whitespace is folding here).
                tags = [dict(t.split("=", 1) for t in re.sub(r"\s", "", value).split(";"))
                        for _, value in fields]
                log.info("dkim-sign id={id} user={user} result=signed d={d} s={s}",
                         id=session.id, user=loggable(session.authenticated), d=tags[0]["d"],
                         s=",".join(t["s"] for t in tags))
            return Verdict.accept(headers=fields)

        def failed(f) -> Verdict:
            # A broken key file must not stop mail: send it unsigned and say so.
            log.error("dkim-sign id={id} not signed: {error}", id=session.id,
                      error=loggable(str(f.value)))
            return Verdict.accept()

        return self._fields(session, message).addCallbacks(signed, failed)


@implementer(IMessageFilterFactory)
class DKIMSignFilterFactory:
    """Registered by L{twistmail.plugins.twistmail_builtin}."""

    name = "dkim-sign"
    description = "DKIM-sign submitted mail (Ed25519 + RSA) for domains with keys (twistmail dkim)"

    def makeFilter(self, options: dict, context) -> DKIMSignFilter:
        from twistmail.config import ConfigError

        unknown = sorted(set(options) - {"processes"})
        if unknown:
            raise ConfigError(f"[filters.dkim-sign] {', '.join(unknown)}: unknown option. "
                              "Fix: remove it (keys come from twistmail dkim generate; the "
                              "one option is processes)")
        count = options.get("processes", 1)
        if type(count) is not int or count < 0:
            raise ConfigError(f"[filters.dkim-sign] processes: expected an integer of at least "
                              f"0, got {count!r}. Fix: write e.g. processes = 1")
        reactor = context.reactor

        def run(f, *args):
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        processes = None
        if count and reactor is not None:
            processes = dkimprocess.DKIMProcesses(reactor, count)
            reactor.addSystemEventTrigger("before", "shutdown", processes.stop)
        return DKIMSignFilter(Signer(KeyRing(context.dataDir), run), processes, context.dataDir)
