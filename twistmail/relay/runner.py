# -*- test-case-name: tests.test_relay_runner -*-
"""QueueRunner: works the relay queue — when to try, where, and what then.

In memory it keeps only each queued message's id, when it is next due (a
dict and a heap) and its *lane* (whose turn it takes, below); the envelope
is read from ``<id>.json`` when the message is due and the body is streamed
from ``<id>.eml``.  That is about 300 octets per waiting message and 400
per due one (tests.test_relay_fairness measures it): 100,000 queued
messages cost 30 to 40 MB.  At most ``2 * max_deliveries`` messages are
being worked on at once.

Fairness: one sender's flood waits behind itself, not behind others.  A
message's lane is its sender's address (case-folded, without ``+tag``) or,
for a bounce (``<>``), its recipient, so backscatter to one address is one
lane.  Due messages take their turns one per lane per round, oldest first
within a lane (``twistmail.relay.fairness``), and so do the attempts
waiting for one of the ``max_deliveries`` slots or of a domain's
``max_deliveries_per_domain`` connections.  A sender alone still gets
every slot; with a compromised account's 5,000 messages queued, another
sender's message takes the next free slot, not the 5,001st.  The
lane is known without reading the files: from the enqueue listener, the
startup scan, or (for ``twistmail sendmail``'s messages, which another
process committed) one read when the server is told of them.  Postfix's
queue manager has no sender notion: it works messages first come first
served with a cap per destination (``default_destination_concurrency_limit``
= 20, our ``max_deliveries_per_domain``), lets a message with few
recipients overtake a mass mailing, and gives bounces their own lifetime
(``bounce_queue_lifetime``); so one account's flood to many domains
delays everyone there.

One attempt at a message: route each due recipient (local account, remote
domain, or unknown), deliver local ones through LocalDelivery and remote
ones in one SMTP transaction per domain (at most ``max_recipients_per_transaction``
recipients each, at most ``max_deliveries_per_domain`` connections per domain
and ``max_deliveries`` in total), then record the outcome:

* delivered → done;
* 5xx or permanent DNS failure (NXDOMAIN, null MX) → bounced at once;
* 4xx, no connection, DNS trouble → retried after ``retry_min`` seconds,
  doubling each time up to ``retry_max`` (RFC 5321 §4.5.4.1), until the
  message is ``max_queue_lifetime`` old; then it bounces.

Bounces (``twistmail.relay.bounce``) are queued like any message, from
``<>``, and never generated for a message from ``<>``.  A domain whose
hosts all refused connections is *suspended* for ``retry_min`` seconds:
other messages for it are deferred without connecting, as Postfix's queue
manager does with a dead destination.

Crash safety: the outcome is written after the remote ``250``, so a crash in
between sends the message again on restart (at least once); a bounce is
queued before the failure is recorded.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistmail import dsn
from twistmail.delivery.routing import (
    LOCAL,
    BadAddress,
    LocalRoute,
    RelayDenied,
    Router,
    UnknownUser,
    remoteDomain,
)
from twistmail.dkimsigner import unsigned
from twistmail.errors import AccountsUnavailable, StorageError
from twistmail.metrics import Metrics
from twistmail.model import Envelope
from twistmail.relay import bounce
from twistmail.relay.fairness import FairQueue, FairSemaphore
from twistmail.relay.mx import DNSFailure
from twistmail.relay.queue import (
    FAILED,
    QUEUED,
    SENT,
    QueueEntry,
    QueueError,
    RelayQueue,
    idTime,
)
from twistmail.relay.sender import DEFERRED, Result, logAttempt

log = Logger()


@dataclass(frozen=True)
class RunnerSettings:
    hostname: str
    retryMin: float = 300
    retryMax: float = 4000
    lifetime: float = 5 * 86400
    maxDeliveries: int = 100
    maxPerDomain: int = 20
    maxRecipients: int = 50
    delayWarning: float = 0  # seconds before a "delayed" DSN; 0 = none

    @classmethod
    def fromConfig(cls, hostname: str, relay) -> RunnerSettings:
        return cls(hostname, relay["retry_min"], relay["retry_max"], relay["max_queue_lifetime"],
                   relay["max_deliveries"], relay["max_deliveries_per_domain"],
                   relay["max_recipients_per_transaction"], relay["delay_warning_time"])


def retryDelay(attempts: int, retryMin: float, retryMax: float) -> float:
    """Exponential backoff after the C{attempts}-th failed attempt (RFC 5321 §4.5.4.1)."""
    return min(retryMax, retryMin * 2 ** min(attempts - 1, 32))


class _Opener:
    """The message file for each SMTP attempt: first the one opened with the entry (one
    worker thread call for both, not two per message), then a new one each time."""

    def __init__(self, queue: RelayQueue, id: str, message) -> None:
        self._queue, self._id, self._first = queue, id, message

    def __call__(self) -> defer.Deferred:
        first, self._first = self._first, None
        return defer.succeed(first) if first is not None else self._queue.openMessage(self._id)

    def close(self) -> None:
        """The first file, if no attempt took it."""
        if self._first is not None:
            self._first.close()
            self._first = None


class QueueRunner(service.Service):
    name = "relay queue"

    def __init__(self, queue: RelayQueue, router: Router, local, destination: Callable,
                 sender, settings: RunnerSettings, clock, metrics: Metrics | None = None,
                 sign: Callable = unsigned) -> None:
        """@param local: L{twistmail.delivery.local.LocalDelivery}.
        @param destination: C{destination(domain) -> Deferred[list[Hop]]} (MX lookup or
            the smarthost); fails with L{DNSFailure}.
        @param sender: L{twistmail.relay.sender.RelaySender}.
        @param clock: IReactorTime; C{seconds()} is POSIX time.
        @param metrics: counts each recipient's outcome.
        @param sign: C{sign(message) -> Deferred[bytes]}: DKIM-signs a bounce (off the reactor).
        """
        self.reports = bounce.Reports(queue, settings.hostname, sign)
        self._queue = queue
        self._router = router
        self._local = local
        self._destination = destination
        self._sender = sender
        self.settings = settings
        self._clock = clock
        self._due: dict[str, float] = {}  # id -> when; only for ids not being worked on
        self._heap: list[tuple[float, str]] = []  # not due yet; may hold stale entries: _due decides
        self._turns = FairQueue()  # the same (when, id) entries once due, waiting for their turn
        self._lane: dict[str, str] = {}  # id -> lane, while the message is queued
        self._learning: set[str] = set()  # ids whose lane is being read from their file
        self._busy: dict[str, defer.Deferred | None] = {}
        self._forced: set[str] = set()  # flushed: try every pending recipient now
        self._deleting: dict[str, list[defer.Deferred]] = {}  # id -> who waits for it
        self._suspended: dict[str, tuple[float, Result]] = {}
        self._slots: dict[str, FairSemaphore] = {}
        self._global = FairSemaphore(settings.maxDeliveries)
        self._maxActive = 2 * settings.maxDeliveries
        self._timer = None
        self._releases: deque = deque()  # slots to release (L{_handOn})
        self._releasing = False
        outcomes = (metrics or Metrics()).relayRecipients
        self._delivered, self._deferred, self._bounced = (
            outcomes.labels(result) for result in ("delivered", "deferred", "bounced"))

    # -- service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._queue.addListener(lambda entry: self.add(entry.id, entry.lane()))
        self._queue.watch(self._found)
        self._queue.scan().addCallbacks(self._scanned, lambda f: log.failure("queue scan", f))

    def _scanned(self, found: list[tuple[str, float, str]]) -> None:
        self._found(found)
        log.info("relay queue: {n} messages", n=len(found))

    def _found(self, found: list[tuple[str, float, str]]) -> None:
        """Messages with work left (the start's scan, or a shared queue's poll)."""
        for id, when, lane in found:
            if id not in self._busy and id not in self._due:
                self._schedule(id, when, lane)
        self._arm()

    def stopService(self):
        """Stop starting deliveries; wait briefly for those under way to record their outcome."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        busy = [d for d in self._busy.values() if d is not None]
        if not busy:
            return None
        done = defer.DeferredList(busy, consumeErrors=True)
        timeout = self._clock.callLater(5, lambda: done.called or done.callback(None))
        return done.addBoth(lambda _: timeout.active() and timeout.cancel())

    # -- what the rest of the server calls ------------------------------------------

    def add(self, id: str, lane: str | None = None) -> None:
        """A new message is in the queue: try it now.

        @param lane: its L{QueueEntry.lane}; if None (``twistmail sendmail``
            queued it), read from its file first.
        """
        if id in self._busy:
            return
        lane = self._lane.get(id) if lane is None else lane
        if lane is None:
            self._learn(id)
            return
        self._schedule(id, self._clock.seconds(), lane)
        self._arm()

    def _learn(self, id: str) -> None:
        if id in self._learning:
            return
        self._learning.add(id)

        def learned(entry: QueueEntry) -> None:
            if id in self._learning:  # not deleted meanwhile
                self._learning.discard(id)
                self.add(id, entry.lane())

        def failed(f: Failure) -> None:
            self._learning.discard(id)
            self._forced.discard(id)
            if f.check(QueueError):
                log.warn("relay id={id}: {why}", id=id, why=f.getErrorMessage())
            else:
                log.failure("relay id={id}: cannot read the queue entry", f, id=id)

        self._queue.load(id).addCallbacks(learned, failed)

    def flush(self, id: str | None = None) -> None:
        """Try now (all messages, or one), whatever their retry times say."""
        now = self._clock.seconds()
        ids = [id] if id is not None else list(self._due) + list(self._busy)
        if id is None:
            self._suspended.clear()
        for one in ids:
            self._forced.add(one)  # a busy one goes again as soon as its attempt ends
            if one in self._lane:
                if one not in self._busy:
                    self._schedule(one, now)
            else:
                self._learn(one)  # not seen yet (sendmail's, just committed)
        self._arm()

    def delete(self, id: str) -> defer.Deferred:
        """Remove a message without delivering it (after its current attempt, if any)."""
        if id in self._busy:
            waiter = defer.Deferred()
            self._deleting.setdefault(id, []).append(waiter)
            return waiter
        self._due.pop(id, None)
        self._lane.pop(id, None)
        self._learning.discard(id)
        return self._queue.remove(id).addCallback(
            lambda _: log.info("relay id={id} deleted by the admin", id=id))

    @property
    def queued(self) -> int:
        return len(self._due) + len(self._busy)

    def stats(self) -> tuple[int, float]:
        """Messages queued, and the age in seconds of the oldest (0 for none).

        Safe from another thread (a metrics scrape): the ids are copied in one
        call, atomic for a dict of strings, and only the copy is read.  Ids of
        one width sort as their time of creation (L{idTime})."""
        ids = self._lane.copy()
        oldest = min((id for id in ids if len(id) == 16), default="")
        born = idTime(oldest)
        return len(ids), max(0.0, self._clock.seconds() - born) if born is not None else 0.0

    # -- scheduling ---------------------------------------------------------------

    def _schedule(self, id: str, when: float, lane: str | None = None) -> None:
        if lane is not None:
            self._lane[id] = lane
        if self._due.get(id) == when:
            return  # already waiting for exactly then
        self._due[id] = when
        heapq.heappush(self._heap, (when, id))

    def _arm(self) -> None:
        if not self.running:
            return
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale
        if len(self._busy) >= self._maxActive:
            return
        if self._turns:
            delay = 0.0
        elif heap:
            delay = max(0.0, heap[0][0] - self._clock.seconds())
        else:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._pump)

    def _pump(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        heap, turns = self._heap, self._turns
        while heap and heap[0][0] <= now:
            due = heapq.heappop(heap)
            if self._due.get(due[1]) == due[0]:
                turns.push(self._lane[due[1]], due)
        while turns and len(self._busy) < self._maxActive and self.running:
            when, id = turns.pop()
            if self._due.get(id) != when:
                continue  # stale: rescheduled, deleted or started meanwhile
            del self._due[id]
            self._busy[id] = d = self._process(id)
            d.addBoth(self._processed, id)
        self._arm()

    def _processed(self, result, id: str) -> None:
        self._busy.pop(id, None)
        for waiter in self._deleting.pop(id, []):
            waiter.callback(None)
        if result is None or isinstance(result, Failure) and result.check(QueueError):
            self._lane.pop(id, None)  # it left the queue
        if isinstance(result, Failure):
            if result.check(QueueError):
                log.warn("relay id={id}: {why}", id=id, why=result.getErrorMessage())
            else:
                if result.check(StorageError):  # the queue's database is down: no bug
                    log.warn("relay id={id}: {why}; retrying later", id=id,
                             why=result.getErrorMessage())
                else:
                    log.failure("relay id={id}: internal error; retrying later", result, id=id)
                self._schedule(id, self._clock.seconds() + self.settings.retryMin)
        elif result is not None:
            if id in self._forced:
                result = self._clock.seconds()
            self._schedule(id, result)
        self._forced.discard(id)
        self._arm()

    # -- one attempt at one message ---------------------------------------------------

    @defer.inlineCallbacks
    def _process(self, id: str):
        """Returns when the message is next due, or None when it left the queue."""
        entry, message = yield self._queue.loadWithMessage(id)
        opener = _Opener(self._queue, id, message)
        try:
            if id in self._deleting:
                yield self._queue.remove(id)
                log.info("relay id={id} deleted by the admin", id=id)
                return None
            now = self._clock.seconds()
            forced = id in self._forced
            self._forced.discard(id)
            due = [r for r in entry.pending() if forced or r.next_attempt <= now]
            if due:
                results = yield self._deliver(entry, due, opener)
                yield self._record(entry, due, results)
        finally:
            opener.close()
        if id in self._deleting:
            yield self._queue.remove(id)
            log.info("relay id={id} deleted by the admin", id=id)
            return None
        if not entry.pending():
            yield self._queue.remove(id)
            return None
        if due:
            yield self._queue.save(entry)
        else:
            yield self._queue.release(id)
        return entry.nextAttempt()

    def _deliver(self, entry: QueueEntry, due: list, opener: _Opener) -> defer.Deferred:
        results: dict[str, Result] = {}
        local: dict[str, tuple] = {}
        remote: dict[str, list[str]] = {}
        for r in due:
            try:
                route = self._router.route(r.address, LOCAL)
            except UnknownUser:
                results[r.address] = Result(FAILED, f"550 5.1.1 <{r.address}>: user unknown in "
                                            "local recipient table", remote=False)
            except (BadAddress, RelayDenied):
                results[r.address] = Result(FAILED, f"553 5.1.3 <{r.address}>: bad address "
                                            "syntax", remote=False)
            except AccountsUnavailable:
                results[r.address] = Result(DEFERRED, f"451 4.3.0 <{r.address}>: accounts "
                                            "unavailable", remote=False)
            else:
                if isinstance(route, LocalRoute):
                    local[r.address] = route.accounts
                else:
                    remote.setdefault(remoteDomain(r.address), []).append(r.address)
        ds = []
        if local:
            ds.append(self._deliverLocal(entry, local))
        limit = self.settings.maxRecipients
        for domain, addresses in remote.items():
            for i in range(0, len(addresses), limit):
                ds.append(self._deliverRemote(entry, domain, addresses[i:i + limit], opener))
        d = defer.gatherResults([d.addCallback(self._noteSent, entry) for d in ds],
                                consumeErrors=True)

        def merge(parts: list[dict]) -> dict:
            for part in parts:
                results.update(part)
            return results

        return d.addCallback(merge)

    def _noteSent(self, part: dict[str, Result], entry: QueueEntry):
        """Tell the queue at once whom this part of the attempt reached (IRelayQueue
        recordSent: a shared queue writes it, so a node taking the message over after
        this one died does not send to them again); the outcome is recorded in full
        after the attempt, as always."""
        sent = [(a, r.reply, r.host if r.remote else "") for a, r in part.items()
                if r.kind == SENT]
        if not sent:
            return part

        def failed(f: Failure) -> None:
            f.trap(StorageError)
            log.warn("relay id={id}: cannot record deliveries yet: {why}", id=entry.id,
                     why=f.getErrorMessage())

        return self._queue.recordSent(entry.id, sent).addErrback(failed).addCallback(
            lambda _: part)

    def _deliverLocal(self, entry: QueueEntry, local: dict[str, tuple]) -> defer.Deferred:
        accounts = tuple(dict.fromkeys(a for targets in local.values() for a in targets))
        envelope = Envelope(sender=entry.sender, recipients=accounts, id=entry.id)
        d = defer.maybeDeferred(self._local.deliver, envelope,
                                self._queue.source(entry.id))

        def done(result) -> dict:
            if isinstance(result, Failure):
                if not result.check(StorageError):
                    log.failure("relay id={id}: local delivery", result, id=entry.id)
                outcome = Result(DEFERRED, f"451 4.3.0 local delivery failed: "
                                 f"{result.getErrorMessage()}", remote=False)
            else:
                outcome = Result(SENT, "250 2.0.0 delivered to mailbox", remote=False)
            results = {address: outcome for address in local}
            logAttempt({"id": entry.id, "domain": "(local)"}, "local", results)
            return results

        return d.addBoth(done)

    def _slot(self, domain: str) -> FairSemaphore:
        slot = self._slots.get(domain)
        if slot is None:
            slot = self._slots[domain] = FairSemaphore(self.settings.maxPerDomain)
        return slot

    def _release(self, domain: str, slot: FairSemaphore) -> None:
        slot.release()
        if slot.idle:
            self._slots.pop(domain, None)

    @defer.inlineCallbacks
    def _deliverRemote(self, entry: QueueEntry, domain: str, addresses: list[str],
                       opener: _Opener):
        # A suspended domain costs no connection slot.  (Checked again once a slot is
        # ours: the attempts ahead of us may have suspended it meanwhile.)
        if self._isSuspended(domain):
            return self._whileSuspended(entry, domain, addresses)
        lane = entry.lane()
        slot = self._slot(domain)
        yield slot.acquire(lane)
        held = [lambda: self._release(domain, slot)]
        try:
            yield self._global.acquire(lane)
            held.insert(0, self._global.release)
            # The sender hands the slots on once the message's data is sent on a
            # connection the next message can pipeline on (twistmail.relay.sender).
            results = yield self._attemptDomain(entry, domain, addresses, opener,
                                                lambda: self._releaseAll(held))
        finally:
            self._releaseAll(held)
        return results

    def _releaseAll(self, held: list[Callable[[], None]]) -> None:
        while held:
            self._handOn(held.pop(0))

    def _handOn(self, release: Callable[[], None]) -> None:
        """Release a slot now: the next waiter's message goes out in this reactor turn
        (a turn later, as before, cost each message a turn's wait; with 20 connections
        a turn is milliseconds).  Never nested: the waiter runs inside this call and,
        for a suspended domain, releases again at once, hundreds deep; such releases
        wait in a list that the outermost call works off."""
        self._releases.append(release)
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._releases:
                self._releases.popleft()()
        finally:
            self._releasing = False

    def _isSuspended(self, domain: str) -> bool:
        suspended = self._suspended.get(domain)
        return suspended is not None and suspended[0] > self._clock.seconds()

    def _whileSuspended(self, entry: QueueEntry, domain: str, addresses: list[str]) -> dict:
        results = {a: self._suspended[domain][1] for a in addresses}
        logAttempt({"id": entry.id, "domain": domain}, "-", results)
        return results

    @defer.inlineCallbacks
    def _attemptDomain(self, entry: QueueEntry, domain: str, addresses: list[str],
                       opener: _Opener, handOff: Callable[[], None]):
        context = {"id": entry.id, "domain": domain, "origin": entry.origin,
                   "dsn": dsn.ofEntry(entry), "body": entry.extra.get("body", "7BIT"),
                   "requiretls": entry.requiresTLS(), "tls_optional": entry.tlsOptional(),
                   "smtputf8": entry.extra.get("smtputf8", False), "handOff": handOff}
        if self._isSuspended(domain):
            return self._whileSuspended(entry, domain, addresses)
        try:
            hops = yield self._destination(domain)
        except DNSFailure as e:
            outcome = Result(DEFERRED if e.temporary else FAILED, e.reply, remote=False)
            if e.temporary:
                self._suspend(domain, outcome)
            results = {a: outcome for a in addresses}
            logAttempt(context, "-", results)
            return results
        results = yield self._sender.send(hops, entry.sender, addresses, opener, context)
        if all(r.kind == DEFERRED and not r.remote and r.reply.split()[1:2] == ["4.4.1"]
               for r in results.values()):
            self._suspend(domain, next(iter(results.values())))  # no host would talk to us
        else:
            self._suspended.pop(domain, None)
        return results

    def _suspend(self, domain: str, cause: Result) -> None:
        code, status, text = (cause.reply.split(None, 2) + ["", ""])[:3]
        reply = f"{code} {status} delivery temporarily suspended: {text}"
        self._suspended[domain] = (self._clock.seconds() + self.settings.retryMin,
                                   Result(DEFERRED, reply, remote=False))

    @defer.inlineCallbacks
    def _record(self, entry: QueueEntry, due: list, results: dict[str, Result]):
        now = self._clock.seconds()
        end = entry.created + self.settings.lifetime
        failed, expired, succeeded = [], set(), []
        for r in due:
            result = results[r.address]
            r.attempts += 1
            r.last_attempt = now
            r.last_reply = result.reply
            r.remote_host = result.host if result.remote else ""
            if result.kind == SENT:
                r.state = SENT
                self._delivered.inc()
                succeeded.append((r, result))
            elif result.kind == FAILED or now >= end:
                r.state = FAILED
                self._bounced.inc()
                failed.append(r)
                if result.kind != FAILED:
                    expired.add(r.address)
            else:
                self._deferred.inc()
                # The last retry happens when the lifetime ends, not a backoff later.
                r.next_attempt = min(now + retryDelay(r.attempts, self.settings.retryMin,
                                                      self.settings.retryMax), end)
        request = dsn.ofEntry(entry)
        if failed:
            yield self._bounce(entry, failed, expired, now, bounce.FAILED)
        # RFC 3461 §4.1: success is reported when asked: "delivered" into a local mailbox,
        # "relayed" to a server without DSN (one with DSN was given NOTIFY: it reports).
        for action, local in ((bounce.DELIVERED, True), (bounce.RELAYED, False)):
            done = [r for r, result in succeeded if result.remote != local
                    and not result.notifies and request.notifies(r.address, "SUCCESS")]
            if done:
                yield self._bounce(entry, done, set(), now, action)
        delay = self.settings.delayWarning
        warned = entry.extra.get("dsn_delay_sent", [])
        late = [r for r in due if r.state == QUEUED and delay and now - entry.created >= delay
                and r.address not in warned and request.notifies(r.address, "DELAY")]
        if late:
            yield self._bounce(entry, late, set(), now, bounce.DELAYED)
            # One delay report per recipient, also across restarts (saved with the entry).
            entry.extra["dsn_delay_sent"] = warned + [r.address for r in late]

    def _bounce(self, entry: QueueEntry, listed: list, expired: set, now: float,
                action: str) -> defer.Deferred:
        return self.reports.report(entry, listed, now, action, expired)
