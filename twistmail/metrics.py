# -*- test-case-name: tests.test_metrics -*-
"""What the server counts, for Prometheus: one L{Metrics} per server, in a registry of its own.

makeService creates one and hands it to the parts that count (listeners,
limiter, SMTP, the password checker and throttle, the relay, TLS); each part
moves its counter in one place.  prometheus_client's global default registry
is not used, so tests and several servers in one process never collide.

Labels take only values the server chooses from a small fixed set (listener
and protocol names, results, SMTP status codes of our own replies, DNS record
types): never a client address, user, domain or anything a client sent, each
of which would add a series per value, an unbounded memory cost.

Gauges that describe state (open connections, the queue) are computed when
scraped, from the objects that hold the state, not kept up to date on every
change.  Scrapes run in a worker thread (prometheus_client's Twisted resource
is a WSGI app), so they only read with operations that are atomic there.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.internet import protocol
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

#: Names a login is counted under (L{twistmail.auth.checkers.fromClient}); others are "other".
LOGIN_PROTOCOLS = frozenset({"smtp", "pop3", "imap"})
#: DNS lookups take milliseconds to the DNS timeout (10 s by default).
DNS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: One delivery attempt: a fast MX answers in well under a second; command timeouts are 300 s.
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Every counter and histogram the server keeps, registered in L{registry}."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.connections = Counter(
            "twistmail_connections", "TCP connections accepted, per listener (smtp, "
            "submissions, imaps, https, metrics...), before any limit", ["listener"],
            registry=registry)
        self.connectionsRefused = Counter(
            "twistmail_connections_refused", "Connections refused by [server] max_connections "
            "(reason=total) or max_connections_per_ip (reason=per_address)", ["reason"],
            registry=registry)
        self.logins = Counter(
            "twistmail_logins", "Password checks, per protocol (smtp, pop3, imap) and result: ok, "
            "failed (wrong user or password) or blocked (the client address is blocked)",
            ["protocol", "result"], registry=registry)
        self.authBlocks = Counter(
            "twistmail_auth_blocked_addresses", "Client addresses blocked for [auth] block_time "
            "after max_failures failed logins", registry=registry)
        self.smtpAccepted = Counter(
            "twistmail_smtp_messages_accepted", "Messages accepted (250 after DATA), per "
            "service (smtp: the MX port; submission)", ["service"], registry=registry)
        self.smtpRejected = Counter(
            "twistmail_smtp_rejections", "SMTP replies 4xx and 5xx, per service, reply code and "
            "RFC 3463 enhanced status code (the reason)", ["service", "code", "status"],
            registry=registry)
        self.relayRecipients = Counter(
            "twistmail_relay_recipients", "Outcomes of relay delivery attempts per recipient: "
            "delivered, deferred (retried later) or bounced", ["result"], registry=registry)
        self.dnsLookups = Histogram(
            "twistmail_dns_lookup_seconds", "Relay DNS lookups (MX, A, AAAA, TXT), answered or "
            "failed", ["type"], buckets=DNS_BUCKETS, registry=registry)
        self.deliveries = Histogram(
            "twistmail_relay_delivery_seconds", "Outbound SMTP delivery attempts to one "
            "destination, connection to last reply, by result: sent, deferred, failed, partial",
            ["result"], buckets=DELIVERY_BUCKETS, registry=registry)
        self.tlsHandshakes = Counter(
            "twistmail_tls_handshakes", "Server-side TLS handshakes (implicit TLS and STARTTLS): "
            "completed, or failed (the connection ended before the handshake did)",
            ["result"], registry=registry)
        self._state = _State()
        registry.register(self._state)

    def watch(self, limiter=None, runner=None) -> None:
        """Read open connections from C{limiter} and the queue from C{runner} at each scrape.

        @param limiter: L{twistmail.protocols.limits.ConnectionLimiter}.
        @param runner: L{twistmail.relay.runner.QueueRunner}.
        """
        if limiter is not None:
            self._state.limiter = limiter
        if runner is not None:
            self._state.runner = runner

    def countConnections(self, listener: str, factory) -> protocol.Factory:
        """C{factory}, counting each connection under C{listener}."""
        return _CountingFactory(factory, self.connections.labels(listener))

    def countHandshakes(self, tls) -> IOpenSSLServerConnectionCreator:
        """C{tls} (L{twistmail.tls.ServerTLS}), counting each handshake's outcome."""
        return _CountingTLS(tls, self.tlsHandshakes.labels("completed"),
                            self.tlsHandshakes.labels("failed"))


class _State:
    """The gauges, computed at scrape time (a custom collector)."""

    limiter = None
    runner = None

    def describe(self):
        return [GaugeMetricFamily("twistmail_connections_open", ""),
                GaugeMetricFamily("twistmail_queue_messages", ""),
                GaugeMetricFamily("twistmail_queue_oldest_message_age_seconds", "")]

    def collect(self):
        if self.limiter is not None:
            yield GaugeMetricFamily("twistmail_connections_open", "Connections open now, on "
                                    "every listener", value=self.limiter.total)
        if self.runner is not None:
            size, age = self.runner.stats()
            yield GaugeMetricFamily("twistmail_queue_messages", "Messages in the relay queue",
                                    value=size)
            yield GaugeMetricFamily("twistmail_queue_oldest_message_age_seconds", "Age of the "
                                    "oldest message in the relay queue; 0 when it is empty",
                                    value=age)


class _CountingFactory(protocol.Factory):
    """Passes every call to the listener's own factory; counts the connections it is asked for.

    The protocol built is the wrapped factory's own, unwrapped: nothing per
    connection is added.  Other attributes are the wrapped factory's, so the
    listener's C{factory} still reads as the protocol's own."""

    def __init__(self, wrapped, counter) -> None:
        self.wrapped = wrapped
        self._counter = counter
        self.noisy = False

    def __getattr__(self, name: str):
        if name == "wrapped":  # not set yet (copying): no endless recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def logPrefix(self) -> str:
        return self.wrapped.logPrefix() if hasattr(self.wrapped, "logPrefix") \
            else self.wrapped.__class__.__name__

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        self._counter.inc()
        return self.wrapped.buildProtocol(addr)


@implementer(IOpenSSLServerConnectionCreator)
class _CountingTLS:
    """A handshake is completed when OpenSSL says so (its info callback), and failed
    when the connection ends before that: garbage, a certificate the client refused,
    a scanner that connects and leaves."""

    def __init__(self, tls, completed, failed) -> None:
        self._tls = tls
        self._completed = completed
        self._failed = failed

    def serverConnectionForTLS(self, tlsProtocol):
        from OpenSSL import SSL

        connection = self._tls.serverConnectionForTLS(tlsProtocol)
        done = []

        def info(connection, where: int, ret: int) -> None:
            if where & SSL.SSL_CB_HANDSHAKE_DONE and not done:  # once, renegotiated or not
                done.append(True)
                self._completed.inc()

        # On the connection: pyOpenSSL forbids changing a context once it has been used.
        connection.set_info_callback(info)
        original = tlsProtocol.connectionLost

        def connectionLost(reason, _original=original) -> None:
            if not done:
                self._failed.inc()
            _original(reason)

        tlsProtocol.connectionLost = connectionLost
        return connection
