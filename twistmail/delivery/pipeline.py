# -*- test-case-name: tests.test_smtp -*-
"""DeliveryPipeline: one accepted message to its local mailboxes and the relay queue.

Both parts are durable before the Deferred fires, so SMTP answers ``250`` only
when every copy is on disk.  If one part fails the other may already be stored;
the client then retries and some recipients get the message twice
(at-least-once, never lost) — the same promise LocalDelivery makes.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from twistmail.delivery.local import allStored
from twistmail.dsn import queueExtra
from twistmail.interfaces import IDeliveryTarget
from twistmail.model import Envelope


@implementer(IDeliveryTarget)
class DeliveryPipeline:
    def __init__(self, local, queue) -> None:
        """@param local: L{twistmail.delivery.local.LocalDelivery}
        @param queue: L{twistmail.relay.queue.RelayQueue}
        """
        self.local = local
        self.queue = queue

    def deliver(self, envelope: Envelope, source) -> defer.Deferred:
        ds = []
        if envelope.recipients:
            ds.append(defer.maybeDeferred(self.local.deliver, envelope, source))
        if envelope.relay:
            ds.append(self.queue.enqueue(envelope.sender, envelope.relay, source.chunks,
                                         id=envelope.id, origin="smtp", client=envelope.client,
                                         helo=envelope.helo, extra=queueExtra(envelope)))
        return allStored(ds)
