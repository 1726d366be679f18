"""LocalDelivery: one fsynced copy per local recipient, through IMailStore only."""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from twistmail.delivery.spool import MessageSource
from twistmail.errors import StorageError
from twistmail.interfaces import IDeliveryTarget
from twistmail.model import Envelope


@implementer(IDeliveryTarget)
class LocalDelivery:
    def __init__(self, store) -> None:
        self._store = store

    def deliver(self, envelope: Envelope, source: MessageSource) -> defer.Deferred:
        """Fire when every recipient's copy is durable in C{envelope.folder} (created if
        missing: "Junk" after a quarantine verdict); fail with StorageError otherwise.

        On a partial failure the copies already stored stay (the client retries
        and those recipients may see the message twice: at-least-once, never lost).
        """
        return allStored([self._store.deliver(rcpt, envelope.folder, source)
                          for rcpt in envelope.recipients])


def allStored(ds: list[defer.Deferred]) -> defer.Deferred:
    """Fire when every one of C{ds} has; fail with the first failure as a StorageError
    (so SMTP answers 451 and the client retries)."""
    if len(ds) == 1:
        return ds[0]

    def unwrap(failure):
        failure.trap(defer.FirstError)
        inner = failure.value.subFailure
        if inner.check(StorageError):
            return inner
        raise StorageError(inner.getErrorMessage())

    return defer.gatherResults(ds, consumeErrors=True).addErrback(unwrap)
