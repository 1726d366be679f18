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
    def __init__(self, store, quota=None) -> None:
        """@param quota: a L{twistmail.delivery.quota.QuotaTracker} told of each copy stored."""
        self._store = store
        self._quota = quota

    def deliver(self, envelope: Envelope, source: MessageSource) -> defer.Deferred:
        """Fire when every recipient's copy is durable in C{envelope.folder} (created if
        missing: "Junk" after a quarantine verdict); fail with StorageError otherwise.

        On a partial failure the copies already stored stay (the client retries
        and those recipients may see the message twice: at-least-once, never lost).
        """
        return allStored([self._store.deliver(rcpt, envelope.folder, source)
                          .addCallback(self._stored, rcpt, source)
                          for rcpt in envelope.recipients])

    def _stored(self, result, rcpt: str, source):
        if self._quota is not None:
            size = getattr(source, "size", None)  # a queued message (a bounce) does not say
            if size is None:
                self._quota.forget(rcpt)
            else:
                self._quota.added(rcpt, size, 1)
        return result


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
