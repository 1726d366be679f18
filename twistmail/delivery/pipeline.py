# -*- test-case-name: tests.test_smtp -*-
"""DeliveryPipeline: one accepted message to its local mailboxes and the relay queue.

Both parts are durable before the Deferred fires, so SMTP answers ``250`` only
when every copy is on disk.  If one part fails the other may already be stored;
the client then retries and some recipients get the message twice
(at-least-once, never lost) — the same promise LocalDelivery makes.

A sender that asked to hear of success (RFC 3461 NOTIFY=SUCCESS) for a local
recipient gets a "delivered" report, queued before the ``250`` (a report that
cannot be queued is logged; the message stays delivered).
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from twistmail.delivery.local import allStored
from twistmail.dsn import queueExtra
from twistmail.filters.message import headerSection
from twistmail.interfaces import IDeliveryTarget
from twistmail.model import Envelope
from twistmail.relay.bounce import DELIVERED, FULL_LIMIT
from twistmail.relay.queue import SENT, QueueEntry, Recipient

log = Logger()


@implementer(IDeliveryTarget)
class DeliveryPipeline:
    def __init__(self, local, queue, reports=None) -> None:
        """@param local: L{twistmail.delivery.local.LocalDelivery}
        @param queue: L{twistmail.relay.queue.RelayQueue}
        @param reports: L{twistmail.relay.bounce.Reports} for success DSNs; None = none.
        """
        self.local = local
        self.queue = queue
        self.reports = reports

    def deliver(self, envelope: Envelope, source) -> defer.Deferred:
        ds = []
        if envelope.recipients:
            ds.append(defer.maybeDeferred(self.local.deliver, envelope, source))
        if envelope.relay:
            ds.append(self.queue.enqueue(envelope.sender, envelope.relay, source.chunks,
                                         id=envelope.id, origin="smtp", client=envelope.client,
                                         helo=envelope.helo, extra=queueExtra(envelope)))
        d = allStored(ds)
        asked = [a for a in envelope.rcptTo if a not in envelope.relay and envelope.dsn
                 is not None and envelope.dsn.notifies(a, "SUCCESS")]
        if asked and self.reports is not None and envelope.recipients:
            d.addCallback(lambda result: self._reportDelivered(envelope, source, asked)
                          .addCallback(lambda _: result))
        return d

    def _reportDelivered(self, envelope: Envelope, source, addresses: list) -> defer.Deferred:
        now = time.time()
        entry = QueueEntry(envelope.id, envelope.sender,
                           [Recipient(a, SENT, 1, 0.0, now, "250 2.0.0 delivered to mailbox")
                            for a in addresses], now, "smtp", extra=queueExtra(envelope))

        def original() -> tuple[bytes, bytes | None]:
            full = envelope.dsn.ret == "FULL" and source.size <= FULL_LIMIT
            return headerSection(source.chunks()), source.getvalue() if full else None

        d = self.reports.report(entry, entry.recipients, now, DELIVERED, original=original)
        return d.addErrback(lambda f: log.failure("smtp id={id}: success report not queued", f,
                                                  id=envelope.id))
