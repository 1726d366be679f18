# -*- test-case-name: tests.test_acme -*-
"""Keeping an ACME certificate current: which names, when to order, and the swap.

L{CertificateKeeper} decides on the reactor; the order itself (network,
signing, files) is L{twistmail.acmeissuer.AcmeIssuer}, run in a thread.  A
new certificate replaces the one in L{ServerTLS}: connections already up keep
the one they started with.  While ordering fails, the certificate in service
stays, and the order is retried after retry_min seconds, doubling up to
retry_max (certbot's timer retries twice a day; Caddy backs off from 1 min).
"""

from __future__ import annotations

import datetime
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import failure

from twistmail._logtext import loggableText
from twistmail.errors import AccountsUnavailable
from twistmail.tls import TLSConfigError, loadOptions

log = Logger()

#: Seconds between checks that the certificate still covers every name (a domain added
#: with the CLI is ordered at the next one).
RECHECK = 12 * 3600

#: Seconds before asking again for the names while the accounts are unavailable
#: (a postgresql accounts store at start, before it has read the domains).
NAMES_RETRY = 5
CERTIFICATE, KEY = "cert.pem", "key.pem"


class OrderFailed(Exception):
    """The CA refused some names of an order (their validation failed)."""

    def __init__(self, names: Iterable[str], detail: str) -> None:
        self.names = list(names)
        super().__init__(detail)


@dataclass(frozen=True)
class Names:
    """The names one certificate covers: C{required} first (the host name is its subject)."""

    required: tuple[str, ...]
    #: the web names (mta-sts., autoconfig., autodiscover.): left out while they fail
    optional: tuple[str, ...] = ()

    def all(self) -> list[str]:
        return list(self.required + self.optional)


@dataclass(frozen=True)
class Schedule:
    renewBefore: float  # seconds before expiry
    retryMin: float
    retryMax: float

    @classmethod
    def fromConfig(cls, tls) -> Schedule:
        return cls(tls["acme_renew_before"] * 86400, tls["acme_retry_min"], tls["acme_retry_max"])


def _name(value: str) -> str:
    return value.lower().rstrip(".")


def certificateNames(hostname: str, domains: Iterable[str], mtaSts: bool, autoconfig: bool,
                     extra: Iterable[str]) -> Names:
    """The host name and C{extra}, then for each hosted domain the names its web
    clients ask for: ``mta-sts.`` (RFC 8461 §3.3) and ``autoconfig.``/``autodiscover.``."""
    required = list(dict.fromkeys(_name(n) for n in (hostname, *extra)))
    prefixes = (("autoconfig.", "autodiscover.") if autoconfig else ()) + \
        (("mta-sts.",) if mtaSts else ())
    optional = [f"{prefix}{_name(domain)}" for domain in sorted(domains) for prefix in prefixes]
    return Names(tuple(required), tuple(n for n in dict.fromkeys(optional) if n not in required))


def namesFromConfig(config, domains: Iterable[str]) -> Names:
    """What this server serves: the web names only when an https listener serves them."""
    https = bool(config.listeners("https"))
    return certificateNames(
        config.hostname, domains, mtaSts=https and bool(config["mta_sts"]["mode"]),
        autoconfig=https and config["autoconfig"]["serve"], extra=config["tls"]["acme_names"])


def inDaemonThread(reactor, f: Callable, *args) -> defer.Deferred:
    """C{f(*args)} in a thread that stopping the server does not wait for.

    An order polls the CA for up to two minutes: a thread pool would be joined
    at shutdown and hold it up that long.  Files are written atomically, so a
    thread cut short leaves nothing half-written in place.  The keeper runs one
    order at a time: one such thread at most.
    """
    d: defer.Deferred = defer.Deferred()

    def run() -> None:
        try:
            result = f(*args)
        except BaseException:
            reactor.callFromThread(d.errback, failure.Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, name="twistmail-acme", daemon=True).start()
    return d


def challengeType(config) -> str:
    """HTTP-01 (RFC 8555 §8.3), which every CA offers, when a plain web listener is there
    for it; TLS-ALPN-01 (RFC 8737) on the https listener otherwise."""
    return "http-01" if config.listeners("http") else "tls-alpn-01"


def startingPair(directory: str, fallbackCert: str, fallbackKey: str) -> tuple[str, str]:
    """The ACME certificate and key if they are there and usable, else the fallback.

    A pair cut short by a crash between the two writes is noticed here and
    replaced by the next order."""
    certPath, keyPath = os.path.join(directory, CERTIFICATE), os.path.join(directory, KEY)
    if not (os.path.exists(certPath) and os.path.exists(keyPath)):
        return fallbackCert, fallbackKey
    try:
        loadOptions(certPath, keyPath)
    except TLSConfigError as e:
        log.warn("acme: the certificate in {path} cannot be used ({error}); serving "
                 "{fallback} until a new one is obtained", path=directory, error=e,
                 fallback=fallbackCert)
        return fallbackCert, fallbackKey
    return certPath, keyPath


def _coverage(path: str) -> tuple[set[str], float]:
    """The DNS names of the certificate at C{path} and when it expires (POSIX time)."""
    from cryptography import x509

    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        names = set(cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = set()
    return {n.lower() for n in names}, cert.not_valid_after_utc.timestamp()


class CertificateKeeper(service.Service):
    """Orders a certificate when there is none, when it nears expiry or lacks a name."""

    def __init__(self, tls, issue: Callable[[list[str]], defer.Deferred],
                 names: Callable[[], Names], directory: str, schedule: Schedule,
                 clock) -> None:
        """
        @param tls: the L{ServerTLS} every listener uses.
        @param issue: orders a certificate for the names; fires once the new
            C{cert.pem} and C{key.pem} are in C{directory}.
        @param names: what the certificate should cover now (hosted domains change).
        """
        self.tls = tls
        self.issue = issue
        self.names = names
        self.certPath = os.path.join(directory, CERTIFICATE)
        self.keyPath = os.path.join(directory, KEY)
        self.schedule = schedule
        self.clock = clock
        self._timer = None
        self._failures = 0
        self._ordering = False
        #: web names whose validation failed, left out until the renewal of the certificate
        #: obtained without them (bounded: a subset of Names.optional)
        self._excluded: set[str] = set()
        self._excludedUntil: float | None = None

    def startService(self) -> None:
        super().startService()
        self._later(0)

    def stopService(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return super().stopService()

    def _later(self, delay: float) -> None:
        if self.running:
            self._timer = self.clock.callLater(max(0, delay), self._check)

    def _current(self) -> tuple[set[str], float] | None:
        if self.tls.certPath != self.certPath:
            return None  # serving the fallback: no ACME certificate yet
        try:
            return _coverage(self.certPath)
        except (OSError, ValueError):
            return None

    def _check(self) -> None:
        self._timer = None
        if self._ordering or not self.running:
            return
        now = self.clock.seconds()
        current = self._current()
        renewAt = current[1] - self.schedule.renewBefore if current else now
        if self._excludedUntil is not None and now >= self._excludedUntil:
            self._excluded.clear()  # a renewal gives every name another chance
            self._excludedUntil = None
        try:
            names = self.names()
        except AccountsUnavailable:
            self._later(NAMES_RETRY)  # ordering without the domains' names would be wasted
            return
        wanted = [n for n in names.all() if n not in self._excluded]
        if current is not None and now < renewAt and set(wanted) <= current[0]:
            self._later(min(renewAt - now, RECHECK))
            return
        self._order(wanted)

    def _order(self, names: list[str]) -> None:
        self._ordering = True
        d = defer.maybeDeferred(self.issue, names)
        d.addCallbacks(self._issued, self._failed, callbackArgs=(names,), errbackArgs=(names,))
        d.addErrback(lambda f: log.failure("acme: unexpected error", f))

    def _issued(self, _, names: list[str]) -> None:
        self._ordering = False
        if not self.running:
            return
        try:
            self.tls.use(self.certPath, self.keyPath)
        except TLSConfigError as e:
            self._failed(None, names, str(e))
            return
        self._failures = 0
        covered, expires = _coverage(self.certPath)
        if self._excluded and self._excludedUntil is None:
            self._excludedUntil = expires - self.schedule.renewBefore
        log.info("acme: serving a new certificate for {names}, valid until {expires}; "
                 "connections already up keep theirs", names=" ".join(names),
                 expires=datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat())
        self._later(0)

    def _failed(self, failure, names: list[str], detail: str | None = None) -> None:
        self._ordering = False
        if not self.running:
            return
        error = failure.value if failure is not None else None
        if isinstance(error, OrderFailed):
            dropped = [n for n in error.names if n in self.names().optional]
            if dropped and len(dropped) == len(error.names):
                # Only web names failed (no CNAME for them yet, say): certify the rest now.
                self._excluded.update(dropped)
                log.warn("acme: leaving {dropped} out of the certificate until the next "
                         "renewal: the CA could not validate them ({error})",
                         dropped=" ".join(dropped), error=loggableText(str(error)))
                self._later(0)
                return
        self._failures += 1
        delay = min(self.schedule.retryMin * 2 ** (self._failures - 1), self.schedule.retryMax)
        if detail is None:
            detail = str(error) or type(error).__name__
        log.error("acme: obtaining a certificate for {names} failed: {error}; retrying in "
                  "{delay:g} s (the current certificate stays in service)",
                  names=" ".join(names), error=loggableText(detail), delay=delay)
        self._later(delay)
