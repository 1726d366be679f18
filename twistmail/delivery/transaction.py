# -*- test-case-name: tests.test_filters -*-
"""The SMTP transaction, apart from the protocol: what to answer, and where mail goes.

L{SMTPPolicy} holds what every session of one listener shares; the protocol
(L{twistmail.protocols.smtp.SMTPServer}) makes one L{Session} per connection
and calls it at connect, HELO, MAIL, RCPT and the end of DATA.  A session
routes recipients, reserves the sender's hourly rate limits and runs the
filter chain: the built-in rules first (L{builtinFilters}), then the
configured filters (``[filters] inbound`` / ``submission``).

Each call fires with a L{Verdict} (connect, HELO) or fails with L{Refused},
which Twisted's ESMTP answers as it is (MAIL, RCPT).  The end of DATA fires
with the final (code, text) after delivery.

What a verdict does at each hook:

* reject / tempfail: that command's reply (at connect: 554 and then only QUIT
  is served, or 421 and close — RFC 5321 §3.1);
* quarantine: the message goes to local recipients' Junk folder (a verdict
  before DATA marks the transaction, or at connect and HELO the session);
* discard: 250, nothing stored, logged (the same scopes);
* accept: headers it carries are added to the message.

Headers filters add are prepended after our ``Received:``, in the order the
filters ran: connect and HELO verdicts' first, then MAIL's, RCPT's, and the
end of DATA's, each filter seeing those added before it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp

from twistmail._logtext import loggable
from twistmail.delivery import quota
from twistmail.delivery.routing import BadAddress, Client, LocalRoute, RelayDenied, UnknownUser
from twistmail.delivery.spool import MessageSource
from twistmail.delivery.trace import receivedHeader, withProtocol
from twistmail.eai import validUTF8
from twistmail.errors import AccountsUnavailable, StorageError
from twistmail.filters.chain import ConfiguredFilter, FilterChain
from twistmail.filters.loop import HopLimit
from twistmail.filters.message import (
    headerLines,
    headerSection,
    parseHeaders,
    withoutOurAuthResults,
)
from twistmail.filters.submission import MessageIdAndDate, SenderOwnership
from twistmail.model import (
    ACCEPT,
    DISCARD,
    QUARANTINE,
    Envelope,
    FilterMessage,
    SessionInfo,
    Verdict,
)
from twistmail.ratelimit import LimitReached, Reservation
from twistmail.requiretls import saysTLSOptional

log = Logger()

#: The folder a quarantine verdict files local copies into (RFC 6154 \Junk).
JUNK = "Junk"
#: Header sections up to this size are parsed on the reactor thread; larger ones
#: (up to HEADER_LIMIT) in a thread.
PARSE_ON_REACTOR = 64 * 1024

_ids = itertools.count()


def transactionId() -> str:
    """Unique per server and over restarts (microseconds + counter), like Postfix's long queue ids."""
    return f"{time.time_ns() // 1000:X}{next(_ids) % 4096:03X}"


class Refused(smtp.SMTPServerError):
    """A MAIL or RCPT answered with C{code} and C{resp}; Twisted's ESMTP sends it as is."""


def builtinFilters(role: str, hostname: bytes, accounts, delimiter: str,
                   checkSender: bool) -> list[ConfiguredFilter]:
    """The rules every listener of C{role} runs before the configured filters."""
    builtins: list = [HopLimit()]
    if role == "submission":
        builtins[:0] = [SenderOwnership(accounts, delimiter, checkSender),
                        MessageIdAndDate(hostname)]
    return [ConfiguredFilter(f.name, f) for f in builtins]


class SMTPPolicy:
    """What the sessions of one listener share: routing, rate limits, filters, delivery."""

    def __init__(self, role: str, hostname: bytes, router, delivery,
                 filters: Sequence[ConfiguredFilter] = (), checkSender: bool = True,
                 sendLimits=None, clock=None, runInThread: Callable | None = None,
                 showClient: bool = True, quota=None) -> None:
        """@param role: "inbound" (the MX port) or "submission".
        @param delivery: an L{twistmail.interfaces.IDeliveryTarget}.
        @param filters: the configured filters of this role, in order.
        @param runInThread: C{f(*args) -> Deferred} running blocking code (a spool
            on disk) off the reactor thread.
        @param showClient: the client's HELO and address in the Received: field
            of authenticated sessions (``[submission] received_client_address``).
        @param quota: a L{twistmail.delivery.quota.QuotaTracker}, or None: no quotas.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        if runInThread is None:
            from twisted.internet import threads

            runInThread = threads.deferToThread
        self.role = role
        self.hostname = hostname
        self.router = router
        self.delivery = delivery
        self.sendLimits = sendLimits
        self.showClient = showClient
        self.quota = quota
        self.runInThread = runInThread
        self.chain = FilterChain(
            builtinFilters(role, hostname, router.accounts, router.delimiter, checkSender)
            + list(filters), clock)

    def session(self, address: str) -> Session:
        return Session(self, address)


@dataclass
class _Marks:
    """Quarantine, discard and headers decided before the end of DATA."""

    quarantine: str = ""  # the filter that asked for it
    discard: str = ""
    headers: list = field(default_factory=list)

    def note(self, outcome) -> None:
        self.headers.extend(outcome.headers)
        if outcome.verdict.action == QUARANTINE:
            self.quarantine = self.quarantine or outcome.decidedBy
        elif outcome.verdict.action == DISCARD:
            self.discard = self.discard or outcome.decidedBy


class Session:
    """One SMTP connection's policy state; the protocol calls it in SMTP order."""

    def __init__(self, policy: SMTPPolicy, address: str) -> None:
        self.policy = policy
        self.info = SessionInfo(policy.role, address)
        self._connect = _Marks()
        self._helo = _Marks()
        self._transaction = _Marks()
        self._routes: list = []
        self._reservation: Reservation | None = None

    # -- state the protocol tells us ---------------------------------------------

    def startedTLS(self) -> None:
        """RFC 3207 §4.2: the session starts over, encrypted."""
        self.reset()
        self.info = SessionInfo(self.info.role, self.info.client, tls=True)
        self._helo = _Marks()

    def authenticated(self, account: str) -> None:
        self.info = replace(self.info, authenticated=account)

    def reset(self) -> None:
        """The transaction ended without a message (RSET, HELO/EHLO, STARTTLS, disconnect)."""
        self._release()
        self._routes = []
        self._transaction = _Marks()
        self.info = replace(self.info, id="", sender=None, recipients=())

    # -- hooks --------------------------------------------------------------------

    def connect(self) -> defer.Deferred:
        """Fires with the verdict at connect (only reject or tempfail refuse the session)."""
        return self._stage("connect", self._connect)

    def helo(self, name: str) -> defer.Deferred:
        self.reset()
        self.info = replace(self.info, helo=name)
        self._helo = _Marks()
        return self._stage("helo", self._helo)

    def mailFrom(self, sender: str, client: Client) -> defer.Deferred:
        """Fires once MAIL is accepted; fails with L{Refused}.  An authenticated user's
        message counts against the hourly limits from here on."""
        self.reset()
        self.info = replace(self.info, id=transactionId(), sender=sender,
                            authenticated=client.authenticated or "")
        d = self._stage("mailFrom", self._transaction)
        d.addCallback(self._refuseUnless)
        d.addCallback(lambda _: self._reserve(client))
        return d.addCallback(lambda _: sender)

    def rcptTo(self, address: str, client: Client, size: int | None = None) -> defer.Deferred:
        """Routes C{address} (RFC 5321 §3.6.2: relaying is the router's decision), checks
        the mailbox's quota (C{size}: MAIL's SIZE=, RFC 1870) and asks the filters;
        fires with the route, or fails with L{Refused}."""
        try:
            route = self.policy.router.route(address, client)
        except RelayDenied:
            return self._refuse(address, "relay denied", 550, "5.7.1 Relaying denied")
        except UnknownUser:
            return self._refuse(address, "user unknown", 550,
                                "5.1.1 User unknown in local recipient table")
        except BadAddress:
            return self._refuse(address, "bad address", 553, "5.1.3 Bad recipient address syntax")
        except AccountsUnavailable:
            return self._refuse(address, "accounts unavailable", 451,
                                "4.3.0 Recipient lookup failed temporarily, try again later")

        def overQuota(failure):
            failure.trap(quota.OverQuota)
            return self._refuse(address, "over quota", failure.value.code, failure.value.text)

        d = quota.checkRcpt(self.policy.quota, route, size).addErrback(overQuota)
        d.addCallback(lambda _: self._stage("rcptTo", self._transaction, address))
        d.addCallback(self._refuseUnless)

        def accepted(_):
            if self._reservation is not None:
                try:
                    self._reservation.addRecipient()  # only accepted recipients count
                except LimitReached as e:
                    self._logLimit(e, client)
                    raise Refused(451, e.reply()) from None
            self._routes.append((address, route))
            self.info = replace(self.info, recipients=self.info.recipients + (address,))
            return route

        return d.addCallback(accepted)

    def data(self, esmtp: bool, utf8: bool = False) -> tuple[Envelope, bytes]:
        """DATA: the envelope of the transaction and our Received: field for it
        (C{utf8}: MAIL had SMTPUTF8)."""
        routes = [route for _, route in self._routes]
        given = tuple(address for address, _ in self._routes)
        envelope = Envelope(
            sender=self.info.sender or "",
            recipients=tuple(dict.fromkeys(
                a for r in routes if isinstance(r, LocalRoute) for a in r.accounts)),
            relay=tuple(dict.fromkeys(r.address for r in routes if not isinstance(r, LocalRoute))),
            client=self.info.client, helo=self.info.helo, id=self.info.id, rcptTo=given)
        info = self.info
        received = receivedHeader(
            self.policy.hostname, info.id,
            withProtocol(esmtp, info.tls, bool(info.authenticated), utf8),
            info.helo.encode("ascii", "replace") if info.helo else None, info.client, list(given),
            showClient=self.policy.showClient or not info.authenticated, utf8=utf8)
        return envelope, received

    def endOfData(self, envelope: Envelope, source: MessageSource) -> defer.Deferred:
        """The end filters, then delivery; fires with the reply (code, text).  Never fails."""
        reservation, self._reservation = self._reservation, None
        stages = (self._connect, self._helo, self._transaction)
        marks = _Marks(next((m.quarantine for m in stages if m.quarantine), ""),
                       next((m.discard for m in stages if m.discard), ""),
                       [h for m in stages for h in m.headers])
        info = self.info
        self._routes, self._transaction = [], _Marks()
        self.info = replace(self.info, id="", sender=None, recipients=())
        spools = [source]
        tagged = [envelope]

        def prepared(result: tuple[MessageSource, bytes]) -> tuple[MessageSource, bytes]:
            spools.append(result[0])
            if not envelope.requireTLS and saysTLSOptional(result[1]):  # RFC 8689 §4.1
                tagged.append(replace(envelope, tlsOptional=True))
            return result

        d = self._prepare(source)
        d.addCallback(prepared)
        d.addCallback(self._endFilters, envelope, marks, info)
        d.addCallback(lambda decided: self._deliver(decided, tagged[-1], marks, reservation))

        def failed(failure) -> tuple[int, bytes]:
            log.failure("delivery of {id} failed", failure, id=envelope.id)
            self._logTransaction(envelope, "deferred: internal error", source.size)
            if reservation is not None:
                reservation.release()
            return 451, b"4.3.0 Local error in processing, try again later"

        def discard(result):
            for spool in spools:
                spool.discard()
            return result

        return d.addErrback(failed).addBoth(discard)

    def dataFailed(self, envelope: Envelope, message: bytes, size: int) -> None:
        """The protocol refused the data itself (too big, a line too long)."""
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None
        self._logTransaction(envelope, f"rejected: {message.decode()}", size)

    def aborted(self, envelope: Envelope, size: int) -> None:
        self._logTransaction(envelope, "aborted: client disconnected in DATA", size)

    # -- the end of DATA ----------------------------------------------------------

    def _prepare(self, source: MessageSource) -> defer.Deferred:
        """Fires with (source, header section) after removing incoming
        Authentication-Results that claim our name (MX only), reading the spool off
        the reactor thread when it is on disk."""
        hostname = self.policy.hostname.decode("ascii", "replace")
        strip = self.policy.role == "inbound"

        def prepare(source: MessageSource) -> tuple[MessageSource, bytes]:
            clean = withoutOurAuthResults(source, hostname) if strip else None
            if clean is not None:
                log.info("smtp id={id} removed Authentication-Results claiming {host} "
                         "(RFC 8601 §5)", id=self.info.id, host=hostname)
                source = clean
            return source, headerSection(source.bodyChunks())

        if source.inMemory:
            return defer.maybeDeferred(prepare, source)
        return self.policy.runInThread(prepare, source)

    def _endFilters(self, prepared, envelope: Envelope, marks: _Marks, info: SessionInfo):
        source, section = prepared
        if envelope.smtputf8 and not validUTF8(section):
            # RFC 6532 §3.2: a header field of an SMTPUTF8 message is UTF-8 (RFC 3629).
            return source, Verdict.reject("5.6.0 Header fields are not valid UTF-8 "
                                          "(RFC 6532 section 3.2)", 554)
        if marks.discard:
            return source, Verdict.discard()
        cache: dict = {}

        def message(added: tuple):
            # Each filter sees the headers added before it (and our Received:).
            extra = headerLines(marks.headers + list(added))
            if extra in cache:
                return info, cache[extra]
            cache.clear()
            whole = source.prefix + extra + section
            # A large header section is parsed in a thread (at most HEADER_LIMIT).
            d = self.policy.runInThread(parseHeaders, whole) if len(whole) > PARSE_ON_REACTOR \
                else defer.succeed(parseHeaders(whole))

            def built(headers):
                cache[extra] = FilterMessage(headers, source.size + len(extra),
                                             lambda: source.open(extra), source.inMemory)
                return info, cache[extra]

            return d.addCallback(built)

        d = self.policy.chain.run("endOfData", before=message, context=_context(info))

        def decided(outcome):
            marks.note(outcome)
            return source, outcome.verdict

        return d.addCallback(decided)

    def _deliver(self, decided, envelope: Envelope, marks: _Marks, reservation):
        source, verdict = decided
        if verdict.action not in (ACCEPT, QUARANTINE, DISCARD):
            if reservation is not None:
                reservation.release()
            self._logTransaction(envelope, f"rejected: {verdict.code} {verdict.text}", source.size)
            return verdict.code, verdict.text.encode()
        if verdict.action == DISCARD:
            if reservation is not None:
                reservation.commit()  # the client believes it sent it
            self._logTransaction(envelope, f"discarded by {marks.discard}", source.size)
            return 250, f"2.0.0 Ok: queued as {envelope.id}".encode()
        source.prefix += headerLines(marks.headers)
        if marks.quarantine:
            envelope = replace(envelope, folder=JUNK)
        d = defer.maybeDeferred(self.policy.delivery.deliver, envelope, source)

        def delivered(ignored):
            result = "+".join(what for what, todo in (("delivered", envelope.recipients),
                                                       ("queued", envelope.relay)) if todo)
            if marks.quarantine:
                result += f" to {envelope.folder} (quarantined by {marks.quarantine})"
            self._logTransaction(envelope, result, source.size)
            if reservation is not None:
                reservation.commit()
            return 250, f"2.0.0 Ok: queued as {envelope.id}".encode()

        def failed(failure):
            if not failure.check(StorageError):
                return failure
            self._logTransaction(envelope, f"deferred: {failure.getErrorMessage()}", source.size)
            if reservation is not None:
                reservation.release()
            return 451, b"4.3.0 Local error in processing, try again later"

        return d.addCallbacks(delivered, failed)

    # -- helpers ---------------------------------------------------------------------

    def _stage(self, hook: str, marks: _Marks, *args) -> defer.Deferred:
        """Run C{hook}; fires with the verdict, having noted quarantine, discard and
        headers in C{marks}."""
        info = self.info
        d = self.policy.chain.run(hook, info, *args, context=_context(info))

        def noted(outcome):
            marks.note(outcome)
            return outcome.verdict

        return d.addCallback(noted)

    @staticmethod
    def _refuseUnless(verdict: Verdict) -> Verdict:
        if verdict.action in (ACCEPT, QUARANTINE, DISCARD):
            return verdict
        raise Refused(verdict.code, verdict.text)

    def _refuse(self, rcpt: str, why: str, code: int, text: str) -> defer.Deferred:
        log.info("smtp reject client={client} from=<{sender}> rcpt=<{rcpt}> result={why}",
                 client=self.info.client, sender=loggable(self.info.sender or ""),
                 rcpt=loggable(rcpt), why=why)
        return defer.fail(Refused(code, text))

    def _reserve(self, client: Client) -> None:
        """An authenticated user's MAIL reserves one message of the hourly limits."""
        limits = self.policy.sendLimits
        if limits is None or not client.authenticated:
            return
        self._release()
        try:
            self._reservation = limits.begin(client.authenticated)
        except LimitReached as e:
            self._logLimit(e, client)
            raise Refused(451, e.reply()) from None

    def _release(self) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def _logLimit(self, e: LimitReached, client: Client) -> None:
        log.info("ratelimit user={user} domain={domain} limit={limit} max={max} client={client} "
                 "result={result}", user=loggable(client.authenticated),
                 domain=loggable(client.authenticated.rpartition("@")[2]), limit=e.key,
                 max=e.limit, client=self.info.client, result="deferred")

    def _logTransaction(self, env: Envelope, result: str, size: int) -> None:
        log.info(
            "smtp id={id} client={client} from=<{sender}> to={rcpts} relay={relay} size={size} "
            "result={result}",
            id=env.id, client=env.client, sender=loggable(env.sender),
            rcpts=",".join(loggable(r) for r in env.rcptTo),
            relay=",".join(loggable(r) for r in env.relay) or "-", size=size,
            result=result,
        )


def _context(info: SessionInfo) -> str:
    """Who and what, for a filter's log line (client text escaped)."""
    parts = [f"client={info.client}"]
    if info.id:
        parts.append(f"id={info.id}")
    if info.sender is not None:
        parts.append(f"from=<{loggable(info.sender)}>")
    return " ".join(parts)
