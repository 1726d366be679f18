# -*- test-case-name: tests.test_relay_mx -*-
"""Where mail for a domain goes: MX records, then addresses (RFC 5321 §5.1).

``DnsPythonMXResolver`` asks DNS with dnspython's blocking resolver in a
thread pool of its own, so lookups never block the reactor and a slow DNS
server cannot starve the disk work in the reactor's pool.  ``resolveHops``
turns its answers into the ordered list of hosts to try; it is written
against ``IMXResolver`` so tests can give it a fake.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from twistmail.interfaces import IMXResolver
from twistmail.metrics import Metrics

#: At most this many addresses are tried per delivery attempt (Postfix: smtp_mx_address_limit).
MAX_ADDRESSES = 5
#: Parsed answers kept on the reactor thread, at most (dnspython's cache holds as many).
MAX_MEMO = 10000
#: Answers kept for the filters' lookups (L{AnswerCache}): a busy inbound server's senders.
MAX_ANSWERS = 10000


class DNSFailure(Exception):
    """A lookup that decides a delivery: ``temporary`` means retry later, otherwise bounce."""

    def __init__(self, temporary: bool, status: str, text: str) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.status = status  # RFC 3463 enhanced status code
        self.text = text

    @property
    def reply(self) -> str:
        """As an SMTP-style reply, the form the queue and DSNs keep."""
        return f"{'451' if self.temporary else '550'} {self.status} {self.text}"


class NotCached(Exception):
    """The answer is not in the cache: ask in a worker thread (L{DnsPythonMXResolver.resolveCached})."""


#: cacheOnly is set while a lookup runs on the reactor thread (L{DnsPythonMXResolver._cachedOrRun}).
_thread = threading.local()


def _nxdomain(name: str, rdtype: str) -> DNSFailure:
    return DNSFailure(False, "5.1.2", f"Host or domain name not found: {name} type={rdtype}: "
                      "NXDOMAIN")


class AnswerCache:
    """The records of (name, type) answers, each until its TTL ends, at most C{size} of them.

    dnspython's own cache is keyed by parsed names: a hit still builds a
    Name, a Resolution and a copy of the answer, about 0.1 ms of Python per
    lookup, several lookups a message (SPF, two DKIM keys, DMARC).  Verifiers
    keep answers by name and type for their TTL as resolvers do (RFC 1035
    §7.4); this is that, for the filters' worker threads.  Only answers (and
    NODATA) are kept, never a failure.  When full, expired entries go first,
    then the oldest tenth.
    """

    def __init__(self, size: int = MAX_ANSWERS, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock  # dnspython's expirations are wall-clock times
        self._entries: dict[tuple[str, str], tuple[tuple, float]] = {}
        self._lock = threading.Lock()  # for eviction; a lookup is one dict read

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, rdtype: str) -> list | None:
        """The records, or None when not kept or expired."""
        entry = self.entry(name, rdtype)
        return None if entry is None else list(entry[0])

    def entry(self, name: str, rdtype: str) -> tuple[tuple, float] | None:
        """(the records, when they expire), or None when not kept or expired."""
        entry = self._entries.get((name, rdtype))
        if entry is None or entry[1] <= self._clock():
            return None
        return entry

    def put(self, name: str, rdtype: str, records: Sequence, expires: float) -> None:
        with self._lock:
            entries = self._entries
            if len(entries) >= self._size and (name, rdtype) not in entries:
                now = self._clock()
                for key in [k for k, (_, e) in entries.items() if e <= now]:
                    del entries[key]
                # The oldest (dicts keep insertion order), a tenth at once: a full cache
                # of live answers is not swept again at every put.
                while len(entries) >= self._size - self._size // 10:
                    del entries[next(iter(entries))]
            entries.pop((name, rdtype), None)
            entries[(name, rdtype)] = (tuple(records), expires)


@dataclass(frozen=True)
class Hop:
    """One host to try, with its addresses in the order to try them."""

    host: str
    addresses: tuple
    preference: int = 0
    #: The destination domain's MTA-STS policy (twistmail.mtasts.Policy), None for none.
    policy: object = None
    #: Named by the domain's MX records (not the domain itself, not a smarthost): without
    #: DNSSEC only an MTA-STS policy vouches for the name (RFC 8689 §4.2.1).
    viaMX: bool = False


@implementer(IMXResolver)
class DnsPythonMXResolver:
    """IMXResolver over ``dns.resolver.Resolver`` (dnspython), run off the reactor thread."""

    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout: float,
                 run: Callable, metrics: Metrics | None = None) -> None:
        """@param nameservers: (address, port) pairs; empty means /etc/resolv.conf.
        @param run: C{run(f, *args) -> Deferred}, e.g. deferToThreadPool on a DNS pool.
        @param metrics: times every lookup, answered or not.
        """
        self._nameservers = list(nameservers)
        self._timeout = timeout
        self._run = run
        self._resolver: dns.resolver.Resolver | None = None
        self._latency = (metrics or Metrics()).dnsLookups
        # (lookup, name) -> (result, expires): the cache's answers as the relay uses them.
        self._memo: dict[tuple[str, str], tuple[list, float]] = {}
        self._answers = AnswerCache()  # the filters' lookups (resolveSync)

    def _get(self) -> dns.resolver.Resolver:
        # Built on first use, in a worker thread: reading /etc/resolv.conf is I/O,
        # and a machine without one should fail deliveries, not the server start.
        if self._resolver is None:
            if self._nameservers:
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                        for host, port in self._nameservers]
            else:
                try:
                    resolver = dns.resolver.Resolver()
                except dns.resolver.NoResolverConfiguration:
                    raise DNSFailure(True, "4.4.3", "no DNS server configured "
                                     "(/etc/resolv.conf or [relay] nameservers)") from None
            resolver.timeout = resolver.lifetime = self._timeout
            resolver.cache = dns.resolver.LRUCache(MAX_MEMO)  # honours TTLs; thread-safe
            self._resolver = resolver
        return self._resolver

    def _query(self, name: str, rdtype: str, answers: AnswerCache | None = None):
        """The answer's records, [] for NODATA; DNSFailure for what is not an answer."""
        started = time.perf_counter()
        try:
            return self._resolve(name, rdtype, answers)
        except NotCached:
            started = None  # not a lookup: it is asked again in a worker thread
            raise
        finally:
            if started is not None:  # the metric locks: safe in a worker thread
                self._latency.labels(rdtype).observe(time.perf_counter() - started)

    def _resolve(self, name: str, rdtype: str, answers: AnswerCache | None = None):
        if getattr(_thread, "cacheOnly", False):
            return self._fromCache(name, rdtype)
        if answers is not None:
            name = name.lower()
            records = answers.get(name, rdtype)
            if records is not None:
                return records
        try:
            answer = self._get().resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise _nxdomain(name, rdtype) from None
        except dns.resolver.NoNameservers:  # every server said SERVFAIL/REFUSED
            raise DNSFailure(True, "4.4.3", f"Host or domain name not found: {name} type={rdtype}: "
                             "SERVFAIL, try again") from None
        except dns.exception.Timeout:
            raise DNSFailure(True, "4.4.3", f"Host or domain name not found: {name} type={rdtype}: "
                             "timed out, try again") from None
        except (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel):
            raise DNSFailure(False, "5.1.2", f"{name!r} is not a valid domain name") from None
        except dns.exception.DNSException as e:
            raise DNSFailure(True, "4.4.3", f"DNS error for {name} type={rdtype}: {e}") from None
        records = list(answer.rrset or ())
        if answers is not None:
            answers.put(name, rdtype, records, answer.expiration)
        return records

    def _fromCache(self, name: str, rdtype: str) -> list:
        """What L{_resolve} would return, from dnspython's cache alone (which drops expired
        answers), without I/O; L{NotCached} when it would have to ask."""
        cache = getattr(self._resolver, "cache", None)
        if not cache:
            raise NotCached()
        try:
            key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)
        except dns.exception.DNSException:
            raise NotCached() from None  # _resolve words the error
        answer = cache.get(key)
        if answer is not None:
            _thread.expires = min(_thread.expires, answer.expiration)
            return list(answer.rrset or ())
        answer = cache.get((key[0], dns.rdatatype.ANY, key[2]))
        if answer is not None and answer.response.rcode() == dns.rcode.NXDOMAIN:
            _thread.expires = min(_thread.expires, answer.expiration)
            raise _nxdomain(name, rdtype)
        raise NotCached()

    def _cachedOrRun(self, f: Callable, arg: str) -> defer.Deferred:
        """C{f(arg)} at once when the cache holds every answer it needs, else in the pool.

        A relay sends to the same few domains again and again: each lookup in a
        thread costs two thread switches and a reactor wake-up per message.
        """
        key = (f.__name__, arg)
        memo = self._memo.get(key)
        if memo is not None and memo[1] > time.time():  # as dnspython's cache decides
            return defer.fail(memo[0]) if isinstance(memo[0], DNSFailure) else \
                defer.succeed(list(memo[0]))
        if self._resolver is None:
            return self._run(f, arg)
        _thread.cacheOnly, _thread.expires = True, float("inf")
        try:
            result = f(arg)
        except NotCached:
            result = None
        except DNSFailure as e:  # a cached NXDOMAIN
            result = e.with_traceback(None)  # each Failure made of it would walk the frames
        finally:
            _thread.cacheOnly = False
        if result is None:
            return self._run(f, arg)
        # Kept, parsed, until the first answer it came from expires.
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        self._memo[key] = (result, _thread.expires)
        return defer.fail(result) if isinstance(result, DNSFailure) else \
            defer.succeed(list(result))

    def resolveSync(self, name: str, rdtype: str) -> list:
        """The dnspython rdata of C{name}/C{rdtype} ([] for NODATA); L{DNSFailure} otherwise.

        Blocking: call it only in a worker thread (L{run}).  For filters (SPF,
        DKIM, DMARC, DNSBL) that share this resolver's servers, timeout and cache.
        Answers are kept by name and type until their TTL ends (L{AnswerCache}).
        """
        return self._query(name, rdtype, self._answers)

    def resolveCached(self, name: str, rdtype: str) -> tuple[list, float]:
        """As L{resolveSync}, from kept answers alone, with the time (C{time.time()})
        they expire: no I/O, so safe on the reactor thread.  L{NotCached} when the
        answer would have to be asked for."""
        entry = self._answers.entry(name.lower(), rdtype)
        if entry is not None:
            return list(entry[0]), entry[1]
        if self._resolver is None:
            raise NotCached()
        _thread.expires = float("inf")  # _fromCache notes the earliest expiry
        try:
            return self._fromCache(name, rdtype), _thread.expires  # NXDOMAIN is kept there
        except DNSFailure as e:
            e.expires = _thread.expires
            raise

    def run(self, f: Callable, *args) -> defer.Deferred:
        """Call C{f(*args)} in the DNS worker pool; for blocking code built on L{resolveSync}."""
        return self._run(f, *args)

    def _mxSync(self, domain: str) -> list[tuple[int, str]]:
        return [(r.preference, "" if r.exchange == dns.name.root else r.exchange.to_text(True))
                for r in self._query(domain, "MX")]

    def _addressesSync(self, host: str) -> list[str]:
        found = []
        for rdtype in ("AAAA", "A"):
            try:
                found += [r.address for r in self._query(host, rdtype)]
            except DNSFailure as e:
                if e.temporary:
                    raise
        return found

    def _txtSync(self, name: str) -> list[str]:
        # RFC 7208 §3.3 / RFC 8461 §3.1: a record's strings are joined without a separator.
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self._query(name, "TXT")]

    def lookupMX(self, domain: str) -> defer.Deferred:
        return self._cachedOrRun(self._mxSync, domain)

    def lookupTXT(self, name: str) -> defer.Deferred:
        return self._cachedOrRun(self._txtSync, name)

    def lookupAddresses(self, host: str) -> defer.Deferred:
        return self._cachedOrRun(self._addressesSync, host)


def orderMX(records: Sequence[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Lowest preference first; equal preferences in random order (RFC 5321 §5.1)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])  # sorted() is stable: ties stay shuffled


def _isAddress(host: str) -> bool:
    if not host[:1].isdigit() and ":" not in host:
        return False  # a host name: no exception raised and caught for every message
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@defer.inlineCallbacks
def resolveHops(resolver: IMXResolver, domain: str, rng: random.Random):
    """The hosts to try for C{domain}, best first.

    @return: Deferred firing with a non-empty list of L{Hop}; fails with
        L{DNSFailure}: permanent for NXDOMAIN and null MX, temporary for
        SERVFAIL, timeouts and MX hosts that have no address (yet).
    """
    records = yield resolver.lookupMX(domain)
    implicit = not records
    if implicit:
        records = [(0, domain)]  # RFC 5321 §5.1: the domain itself is the MX
    elif any(host in ("", ".") for _, host in records):
        if len(records) == 1:
            # RFC 7505 §3: the domain accepts no mail; reply code 556 per §4.3.
            raise DNSFailure(False, "5.1.10", f"Domain {domain} does not accept mail (null MX)")
        records = [r for r in records if r[1] not in ("", ".")]
    ordered = orderMX(records, rng)
    results = yield defer.DeferredList(
        [defer.succeed([host]) if _isAddress(host) else resolver.lookupAddresses(host)
         for _, host in ordered], consumeErrors=True)
    hops, errors = [], []
    for (pref, host), (ok, found) in zip(ordered, results, strict=True):
        if not ok:
            errors.append(found.value)
        elif found:
            hops.append(Hop(host, tuple(found), pref, viaMX=not implicit))
    if hops:  # a host whose lookup failed is skipped, as if it were down
        return hops
    if errors:
        error = errors[0]
        raise error if isinstance(error, DNSFailure) else DNSFailure(True, "4.4.3", str(error))
    if implicit:
        raise DNSFailure(False, "5.1.2", f"Host or domain name not found: {domain} has no MX, "
                         "A or AAAA record")
    raise DNSFailure(True, "4.4.3", f"No address for any MX host of {domain} "
                     f"({', '.join(h for _, h in ordered)})")


@defer.inlineCallbacks
def resolveSmarthost(resolver: IMXResolver, host: str):
    """The smarthost as one hop: its addresses only, no MX lookup (Postfix's ``[host]``)."""
    found = [host] if _isAddress(host) else (yield resolver.lookupAddresses(host))
    if not found:
        raise DNSFailure(True, "4.4.3", f"Host not found: smarthost {host} has no address")
    return [Hop(host, tuple(found))]


def applyPolicy(hops: Sequence[Hop], policy, domain: str) -> list[Hop]:
    """The hops with the domain's MTA-STS policy attached; under enforce only listed MX hosts.

    @raise DNSFailure: (temporary) when enforce leaves no host to try (RFC 8461 §4.2).
    """
    if policy is None or policy.mode not in ("enforce", "testing"):
        return list(hops)
    attached = [dataclasses.replace(h, policy=policy) for h in hops]
    if policy.mode == "testing":
        return attached  # RFC 8461 §5: testing delivers to every MX, reporting mismatches
    allowed = [h for h in attached if policy.matches(h.host)]
    if not allowed:
        raise DNSFailure(True, "4.7.5", f"MTA-STS policy (enforce) of {domain} lists none of its "
                         f"MX hosts ({', '.join(h.host for h in hops)})")
    return allowed


#: Seconds a domain's hops are reused (L{DestinationCache}).
DESTINATION_CACHE_TIME = 5.0
#: Domains whose hops are kept at most.
MAX_DESTINATIONS = 10000


class DestinationCache:
    """C{destination(domain)} with each domain's answer reused for a few seconds.

    Resolving a domain takes an MX lookup, an address lookup per host and the
    MTA-STS policy, each an inlineCallbacks chain even when the answers are
    cached: for a queue of thousands of messages to a few domains that is a
    good part of the relay's CPU per message.  Postfix's connection cache
    skips the lookup the same way: a cached connection is found by destination
    name, not by address.  Only answers are kept; a failure is asked again
    (the runner suspends a domain that keeps failing), and the lookups of one
    domain that overlap are one.  Hosts of equal preference are shuffled again
    on every use, so the load still spreads over them (RFC 5321 §5.1).
    """

    def __init__(self, destination: Callable[[str], defer.Deferred],
                 seconds: Callable[[], float], rng: random.Random,
                 cacheTime: float = DESTINATION_CACHE_TIME) -> None:
        """@param destination: C{destination(domain) -> Deferred[list[Hop]]}, e.g. MX
            resolution with the MTA-STS policy applied.
        @param seconds: the clock (C{reactor.seconds})."""
        self._destination = destination
        self._seconds = seconds
        self._rng = rng
        self._cacheTime = cacheTime
        self._cached: dict[str, tuple[list[Hop], float]] = {}  # domain -> (hops, expires)
        self._pending: dict[str, list[defer.Deferred]] = {}

    def __call__(self, domain: str) -> defer.Deferred:
        cached = self._cached.get(domain)
        if cached is not None:
            if cached[1] > self._seconds():
                return defer.succeed(self._reordered(cached[0]))
            del self._cached[domain]
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._pending.get(domain)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[domain] = [waiter]
        defer.maybeDeferred(self._destination, domain).addBoth(self._answered, domain)
        return waiter

    def _answered(self, result, domain: str) -> None:
        if not isinstance(result, Failure):
            if len(self._cached) >= MAX_DESTINATIONS:
                now = self._seconds()
                self._cached = {d: c for d, c in self._cached.items() if c[1] > now}
                if len(self._cached) >= MAX_DESTINATIONS:
                    self._cached.clear()
            self._cached[domain] = (list(result), self._seconds() + self._cacheTime)
        for waiter in self._pending.pop(domain):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(self._reordered(result))

    def _reordered(self, hops: list[Hop]) -> list[Hop]:
        if len(hops) < 2:
            return list(hops)
        shuffled = list(hops)
        self._rng.shuffle(shuffled)
        return sorted(shuffled, key=lambda h: h.preference)
