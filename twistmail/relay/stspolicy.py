# -*- test-case-name: tests.test_stspolicy -*-
"""Recipient domains' MTA-STS policies (RFC 8461 §3, §5.1): DNS, HTTPS fetch, cache.

``PolicySource.policyFor(domain)`` is what the relay asks before each
delivery.  It looks up ``_mta-sts.<domain>`` TXT with the relay's resolver;
when the record's id differs from the cached policy's (or nothing is cached)
``PolicyFetcher`` fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt``.
A policy is kept for its ``max_age`` in memory (bounded) and on disk (one
JSON file per domain, written atomically in a thread), so a restart does not
forget it.  The cache is the downgrade protection: while an unexpired policy
is cached, an attacker who strips the TXT record, breaks DNS or blocks the
HTTPS fetch only gets the cached policy applied.  Policies are not refreshed
ahead of expiry (RFC 8461 suggests it for domains mail keeps going to;
not done yet).

The fetch is on Twisted's ``Agent`` rather than treq: treq always adds a
gzip ``ContentDecoderAgent`` (one 32 KiB TLS read can inflate to ~32 MiB
before any size check sees it), a cookie jar, and buffers bodies unless told
not to; this fetch needs none of them.  Connections resolve the host name
with the relay's resolver (``[relay] nameservers``), never the system's, and
verify the certificate for ``mta-sts.<domain>``.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from twistmail._dnsname import isHostName
from twistmail._fsutil import atomicWrite
from twistmail._httpbody import LimitedBody
from twistmail._logtext import loggableText
from twistmail.mtasts import MAX_POLICY_BYTES, Policy, PolicyError, parsePolicy, parseRecord
from twistmail.relay.mx import MAX_ADDRESSES, DNSFailure

log = Logger()

#: Policies kept in memory; the disk cache holds the rest.  A policy is at most 64 KiB.
MAX_CACHED = 1000
#: Octets one fetch may receive in all, headers and framing included.
MAX_RESPONSE_BYTES = 2 * MAX_POLICY_BYTES
#: RFC 8461 §3.3: the policy's well-known path.
WELL_KNOWN = "/.well-known/mta-sts.txt"
#: The on-disk format; a file of another version is ignored (refetched).
CACHE_VERSION = 1



class FetchError(Exception):
    """The policy could not be fetched (the text says why, for the log)."""


def policyDomain(domain: str) -> str | None:
    """The domain as an ASCII name fit for a URL and a file name, or None."""
    try:
        name = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    # Room for the policy host's "mta-sts." in front of it.
    return name if isHostName("mta-sts." + name, minLabels=3) else None


class _CappedProtocol(ProtocolWrapper):
    """Hangs up once the server has sent more than MAX_RESPONSE_BYTES: Twisted's HTTP
    client bounds the length of a header line but not their number."""

    received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_RESPONSE_BYTES:
            log.info("mta-sts fetch from {host}: more than {limit} octets; hung up",
                     host=self.factory.host, limit=MAX_RESPONSE_BYTES)
            self.transport.abortConnection()
            return
        super().dataReceived(data)


class _CappedFactory(WrappingFactory):
    protocol = _CappedProtocol

    def __init__(self, wrappedFactory, host: str) -> None:
        super().__init__(wrappedFactory)
        self.host = host


@implementer(IStreamClientEndpoint)
class _ResolvedTLSEndpoint:
    """TLS to a host name whose addresses the relay's resolver gives, tried in order."""

    def __init__(self, reactor, resolver, host: str, port: int, tls, timeout: float) -> None:
        self._reactor, self._resolver, self._host = reactor, resolver, host
        self._port, self._tls, self._timeout = port, tls, timeout

    @defer.inlineCallbacks
    def connect(self, factory):
        addresses = yield self._resolver.lookupAddresses(self._host)
        last = error.DNSLookupError(f"{self._host} has no address")
        for address in addresses[:MAX_ADDRESSES]:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            tcp = kind(self._reactor, address, self._port, timeout=self._timeout)
            try:
                capped = yield wrapClientTLS(self._tls, tcp).connect(
                    _CappedFactory(factory, self._host))
                return capped.wrappedProtocol  # what the HTTP pool talks to
            except error.ConnectError as e:
                last = e
        raise last


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(self, reactor, resolver, port: int, trustRoot, timeout: float) -> None:
        self._reactor, self._resolver, self._port = reactor, resolver, port
        self._trustRoot, self._timeout = trustRoot, timeout

    def endpointForURI(self, uri):
        if uri.scheme != b"https":  # never plain HTTP (RFC 8461 §3.3)
            raise error.SchemeNotSupported(uri.scheme)
        host = uri.host.decode("ascii")
        # RFC 8461 §3.3: the certificate must be valid for mta-sts.<domain>.
        tls = optionsForClientTLS(host, trustRoot=self._trustRoot)
        return _ResolvedTLSEndpoint(self._reactor, self._resolver, host, self._port, tls,
                                    self._timeout)


class PolicyFetcher:
    """GETs ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` as RFC 8461 §3.3 says."""

    def __init__(self, reactor, resolver, port: int = 443, trustRoot=None, timeout: float = 30,
                 clock=None) -> None:
        """@param resolver: the relay's IMXResolver (its lookupAddresses).
        @param trustRoot: CAs to verify with; None is the system's.
        @param timeout: seconds for the whole fetch, connection to last octet.
        @param clock: what times the fetch out (the reactor unless a test's).
        """
        pool = HTTPConnectionPool(reactor, persistent=False)  # one fetch, one connection
        self._agent = Agent.usingEndpointFactory(
            reactor, _EndpointFactory(reactor, resolver, port, trustRoot, timeout), pool)
        self._timeout = timeout
        self._clock = clock if clock is not None else reactor

    def fetch(self, domain: str) -> defer.Deferred:
        """@return: Deferred firing with the body; fails with L{FetchError}."""
        d = self._fetch(domain)
        timedOut = []

        def timeout():
            timedOut.append(True)
            d.cancel()  # aborts the connection, whichever step it is in

        call = self._clock.callLater(self._timeout, timeout)

        def failed(failure):
            if timedOut:  # the cancellation surfaces wrapped (ResponseNeverReceived...)
                raise FetchError(f"timed out after {self._timeout} s")
            if failure.check(FetchError):
                return failure
            raise FetchError(_reason(failure))

        def finished(result):
            if call.active():
                call.cancel()
            return result

        d.addBoth(finished)
        return d.addErrback(failed)

    @defer.inlineCallbacks
    def _fetch(self, domain: str):
        url = f"https://mta-sts.{domain}{WELL_KNOWN}".encode("ascii")
        # No Accept-Encoding: identity only; Agent follows no redirect (RFC 8461 §3.3).
        response = yield self._agent.request(
            b"GET", url, Headers({b"user-agent": [b"twistmail MTA-STS"]}))
        body = LimitedBody(MAX_POLICY_BYTES, FetchError, "policy")
        response.deliverBody(body)  # read or hung up on, whatever the verdict: no idle socket
        if not 200 <= response.code < 300:  # RFC 8461 §3.3: redirects and errors are failures
            _refuse(body, f"HTTP {response.code}")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/plain":  # RFC 8461 §3.2
            _refuse(body, f"Content-Type {loggableText(ctype.decode('latin-1'), 64)!r} "
                          "is not text/plain")
        if response.headers.getRawHeaders(b"content-encoding", [b"identity"])[0] != b"identity":
            _refuse(body, "the policy came content-encoded, which was not asked for")
        return (yield body.done)


def _refuse(body: LimitedBody, why: str):
    """Hang up on the response's body and fail the fetch with C{why}."""
    body.done.addErrback(lambda _: None)
    body.done.cancel()
    raise FetchError(why)


def _reason(failure) -> str:
    """Why a fetch failed, in one line: the TLS or connection error, not a list of Failures."""
    reasons = getattr(failure.value, "reasons", None)  # ResponseNeverReceived, ResponseFailed
    if reasons:
        failure = reasons[0]
    return failure.getErrorMessage() or failure.type.__name__


class PolicySource:
    """policyFor(domain): the policy to apply to a delivery, from DNS, HTTPS or the cache."""

    def __init__(self, resolver, fetcher: PolicyFetcher, directory: str, run: Callable,
                 now: Callable[[], float] = time.time) -> None:
        """@param directory: the disk cache, created when first written.
        @param run: C{run(f, *args) -> Deferred}: disk work off the reactor thread.
        """
        self._resolver = resolver
        self._fetcher = fetcher
        self._directory = directory
        self._run = run
        self._now = now
        # LRU: domain -> (policy, expires), or None when nothing is cached for it.
        self._memory: OrderedDict[str, tuple[Policy, float] | None] = OrderedDict()
        # One lookup per domain at a time; at most one entry per running delivery.
        self._pending: dict[str, list[defer.Deferred]] = {}

    def policyFor(self, domain: str) -> defer.Deferred:
        """@return: Deferred firing with the L{Policy} to apply, or None; never fails."""
        name = policyDomain(domain)
        if name is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        if name in self._pending:
            self._pending[name].append(waiter)
            return waiter
        self._pending[name] = [waiter]

        def done(result):
            for d in self._pending.pop(name):
                d.callback(result)

        self._lookup(name).addErrback(self._unexpected, name).addCallback(done)
        return waiter

    def _unexpected(self, failure, domain: str) -> None:
        log.failure("mta-sts domain={domain} lookup failed", failure, domain=domain)
        return None

    @defer.inlineCallbacks
    def _lookup(self, domain: str):
        cached = yield self._cached(domain)
        try:
            id = parseRecord((yield self._resolver.lookupTXT(f"_mta-sts.{domain}")))
        except DNSFailure as e:
            if e.temporary:  # RFC 8461 §5.1: DNS trouble: the cached policy, if any
                return self._use(domain, cached, "dns-failed", e.text)
            id = None  # NXDOMAIN: no record
        except PolicyError as e:
            return self._use(domain, cached, "bad-record", str(e))
        if id is None:
            return self._use(domain, cached, "no-record", "")
        if cached is not None and cached.id == id:
            return self._use(domain, cached, "cached", "")  # RFC 8461 §5.1: id unchanged
        try:
            body = yield self._fetcher.fetch(domain)
            policy = parsePolicy(body, id)
        except (FetchError, PolicyError) as e:
            # RFC 8461 §5.1: a failed refetch leaves the unexpired cached policy in force.
            return self._use(domain, cached, "fetch-failed", str(e))
        fetched = self._now()
        self._remember(domain, (policy, fetched + policy.maxAge))
        try:
            yield self._run(self._write, domain, body, id, fetched)
        except OSError as e:
            log.warn("mta-sts domain={domain} policy not cached on disk: {why}",
                     domain=domain, why=e)
        log.info("mta-sts domain={domain} result={result} id={id} max_age={maxAge} source=fetched",
                 domain=domain, result=policy.mode, id=id, maxAge=policy.maxAge)
        return policy

    def _use(self, domain: str, cached: Policy | None, why: str, detail: str) -> Policy | None:
        """Log what is applied and why, unless it is the usual (the cached policy, or none
        and no record): that would be a line per message, and twistd logs debug too."""
        if why != "cached" and (why != "no-record" or cached is not None):
            log.info("mta-sts domain={domain} result={why} detail={detail} using={using}",
                     domain=domain, why=why, detail=loggableText(detail, 200),
                     using=f"cached-{cached.mode}" if cached is not None else "none")
        return cached

    def _remember(self, domain: str, entry: tuple[Policy, float] | None) -> None:
        """Keep (policy, expires), or None: nothing cached, not even on disk (no disk read)."""
        self._memory[domain] = entry
        self._memory.move_to_end(domain)
        while len(self._memory) > MAX_CACHED:
            self._memory.popitem(last=False)

    @defer.inlineCallbacks
    def _cached(self, domain: str):
        """The unexpired cached policy, from memory or else from disk; None for none."""
        if domain in self._memory:
            entry = self._memory[domain]
        else:
            found = yield self._run(self._read, domain)
            entry = None if found is None else (found[0], found[1] + found[0].maxAge)
        if entry is not None and self._now() >= entry[1]:  # RFC 8461 §3.2: max_age passed
            entry = None
        self._remember(domain, entry)
        return None if entry is None else entry[0]

    def _path(self, domain: str) -> str:
        return os.path.join(self._directory, f"{domain}.json")

    def _write(self, domain: str, body: bytes, id: str, fetched: float) -> None:
        """In a thread: the policy as fetched, so parsing on load is the same parsing."""
        os.makedirs(self._directory, mode=0o700, exist_ok=True)
        record = {"version": CACHE_VERSION, "domain": domain, "id": id, "fetched": fetched,
                  "policy": body.decode("utf-8")}
        atomicWrite(self._path(domain), json.dumps(record, indent=1).encode() + b"\n")

    def _read(self, domain: str) -> tuple[Policy, float] | None:
        """In a thread: (policy, fetched) from disk; None when absent or unreadable."""
        try:
            with open(self._path(domain), "rb") as f:
                record = json.loads(f.read(4 * MAX_POLICY_BYTES))
            if record.get("version") != CACHE_VERSION:
                return None
            return (parsePolicy(record["policy"].encode("utf-8"), record["id"]),
                    float(record["fetched"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warn("mta-sts domain={domain} ignoring the disk cache {path}: {why}",
                     domain=domain, path=self._path(domain), why=e)
            return None
