# -*- test-case-name: tests.test_dkimsign -*-
"""The ``dkim-sign`` filter: sign submitted mail at the end of DATA.

Meant to run last on submission (after Message-ID and Date are added), so the
signature covers the message as it leaves.  It signs only for a client that
authenticated or came in on the submission port: an unauthenticated message
on the MX port that claims our From is exactly what must not get our signature.
"""

from __future__ import annotations

import re

from twisted.internet import threads
from twisted.logger import Logger
from zope.interface import implementer

from twistmail._logtext import loggable
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer
from twistmail.filters.base import Filter
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import Verdict

log = Logger()


def _read(message) -> bytes:
    with message.open() as f:
        return f.read()


class DKIMSignFilter(Filter):
    name = "dkim-sign"

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    def _sign(self, message) -> list:
        return self._signer.headers(_read(message))

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

        return self._signer.inThread(self._sign, message).addCallbacks(signed, failed)


@implementer(IMessageFilterFactory)
class DKIMSignFilterFactory:
    """Registered by L{twistmail.plugins.twistmail_builtin}."""

    name = "dkim-sign"
    description = "DKIM-sign submitted mail (Ed25519 + RSA) for domains with keys (twistmail dkim)"

    def makeFilter(self, options: dict, context) -> DKIMSignFilter:
        from twistmail.config import ConfigError

        if options:
            raise ConfigError(f"[filters.dkim-sign] {', '.join(sorted(options))}: unknown option. "
                              "Fix: remove it (keys come from twistmail dkim generate)")
        reactor = context.reactor

        def run(f, *args):
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        return DKIMSignFilter(Signer(KeyRing(context.dataDir), run))
