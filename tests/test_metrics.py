"""Prometheus metrics: each hook moves exactly its counter, and ``/metrics`` serves them.

Unit tests drive each component over StringTransport, task.Clock or iosim with
a L{Metrics} of its own (one registry per test: nothing global to reset); one
loopback test starts the real service tree with a metrics listener, speaks
SMTP, POP3 and IMAP to it and scrapes ``/metrics`` with http.client.
"""

from __future__ import annotations

import http.client
import imaplib
import io
import poplib
import smtplib

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import addUser, freePort, onReactor, startServer
from test_relay_runner import ALICE, World
from twisted.cred import error as credError
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from twistmail import config as configmod
from twistmail.auth.accounts import Accounts
from twistmail.auth.checkers import PasswordChecker, fromClient
from twistmail.auth.throttle import AuthThrottle
from twistmail.delivery.local import LocalDelivery
from twistmail.delivery.routing import RelayPolicy, Router
from twistmail.metrics import Metrics
from twistmail.protocols.limits import ConnectionLimiter
from twistmail.protocols.smtp import SMTPFactory
from twistmail.relay.mx import DNSFailure, DnsPythonMXResolver, Hop
from twistmail.relay.queue import FAILED, SENT
from twistmail.relay.runner import QueueRunner
from twistmail.relay.sender import DEFERRED, RelaySender, Result, SenderSettings
from twistmail.storage.maildir import MaildirStore
from twistmail.tls import ServerTLS, generateSelfSigned

PEER = IPv4Address("TCP", "203.0.113.9", 4321)


def value(metrics: Metrics, name: str, **labels) -> float:
    """A sample's value; 0 when the series does not exist yet."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- the registry ---------------------------------------------------------------------


def test_every_metric_follows_prometheus_naming_in_a_registry_of_its_own():
    from prometheus_client import REGISTRY

    metrics = Metrics()
    families = list(metrics.registry.collect())
    assert len(families) == 10  # the gauges appear once watch() names their source
    for family in families:
        assert family.name.startswith("twistmail_"), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name
    assert REGISTRY.get_sample_value("twistmail_logins_total",
                                     {"protocol": "imap", "result": "ok"}) is None
    Metrics()  # a second server in the same process: no "Duplicated timeseries"


# -- connections ----------------------------------------------------------------------


def test_connections_are_counted_per_listener_and_refusals_by_reason():
    metrics = Metrics()
    limiter = ConnectionLimiter(3, 1, metrics)
    metrics.watch(limiter=limiter)
    plain = protocol.Factory.forProtocol(protocol.Protocol)

    class Limited(protocol.Factory):
        def buildProtocol(self, addr):
            from twistmail.protocols.limits import admit
            return admit(limiter, addr, b"421 ", lambda: plain.buildProtocol(addr))

    counted = metrics.countConnections("submissions", Limited())
    first = counted.buildProtocol(PEER)
    first.makeConnection(StringTransport(peerAddress=PEER))
    second = counted.buildProtocol(PEER)  # the same address: over max_connections_per_ip
    second.makeConnection(StringTransport(peerAddress=PEER))
    assert value(metrics, "twistmail_connections_total", listener="submissions") == 2
    assert value(metrics, "twistmail_connections_refused_total", reason="per_address") == 1
    assert value(metrics, "twistmail_connections_refused_total", reason="total") == 0
    assert value(metrics, "twistmail_connections_open") == 1
    first.connectionLost(None)
    assert value(metrics, "twistmail_connections_open") == 0


# -- SMTP -----------------------------------------------------------------------------


class Stored:
    """A delivery that stores nothing and succeeds."""

    def deliver(self, envelope, source):
        return defer.succeed(None)


def smtpSession(dataDir, metrics, commands: bytes, submission=False) -> bytes:
    addUser(dataDir, ALICE)
    config = configmod.load(None)
    factory = SMTPFactory(config["smtp"], "mx.example.test",
                          Router(Accounts(dataDir), RelayPolicy([])), Stored(), dataDir,
                          submission=submission, metrics=metrics)
    proto = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    proto.dataReceived(commands)
    proto.connectionLost(None)
    return transport.value()


def test_smtp_rejections_are_counted_by_enhanced_status_and_accepted_messages_by_service(dataDir):
    metrics = Metrics()
    replies = smtpSession(dataDir, metrics,
                          b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\n"
                          b"RCPT TO:<nobody@example.test>\r\n"   # 550 5.1.1
                          b"RCPT TO:<bob@remote.test>\r\n"       # 550 5.7.1
                          b"RCPT TO:<alice@example.test>\r\n"
                          b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"
                          b"FROB\r\n")                           # 500 5.5.2
    assert b"250 2.0.0 Ok: queued" in replies
    assert value(metrics, "twistmail_smtp_messages_accepted_total", service="smtp") == 1
    assert value(metrics, "twistmail_smtp_messages_accepted_total", service="submission") == 0
    assert value(metrics, "twistmail_smtp_rejections_total", service="smtp", code="550",
                 status="5.1.1") == 1
    assert value(metrics, "twistmail_smtp_rejections_total", service="smtp", code="550",
                 status="5.7.1") == 1
    assert value(metrics, "twistmail_smtp_rejections_total", service="smtp", code="500",
                 status="5.5.2") == 1


def test_submission_without_auth_is_a_submission_rejection(dataDir):
    metrics = Metrics()
    smtpSession(dataDir, metrics, b"EHLO c\r\nMAIL FROM:<alice@example.test>\r\n", submission=True)
    assert value(metrics, "twistmail_smtp_rejections_total", service="submission", code="530",
                 status="5.7.0") == 1


def test_a_client_chosen_verb_or_text_never_becomes_a_label(dataDir):
    """Labels take only values the server chose: an unbounded set would be a memory DoS."""
    metrics = Metrics()
    smtpSession(dataDir, metrics, b"".join(b"X%dY\r\n" % n for n in range(15)))
    samples = [s for f in metrics.registry.collect() if f.name == "twistmail_smtp_rejections"
               for s in f.samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in samples] == \
        [({"service": "smtp", "code": "500", "status": "5.5.2"}, 15)]


# -- logins ---------------------------------------------------------------------------


def login(checker, protocol_, password, client="192.0.2.7"):
    out = []
    checker.requestAvatarId(fromClient(UsernamePassword(ALICE.encode(), password), client,
                                       protocol_)).addBoth(out.append)
    return out


def test_logins_are_counted_per_protocol_and_result_and_blocks_per_address(dataDir):
    addUser(dataDir, ALICE)
    metrics = Metrics()
    clock = task.Clock()
    throttle = AuthThrottle(0.5, 1, 2, 600, 600, clock=clock.seconds, metrics=metrics)
    checker = PasswordChecker(Accounts(dataDir), defer.maybeDeferred, throttle, clock, metrics)
    assert login(checker, "imap", b"secret") == [ALICE]
    for protocol_, wrong in (("pop3", b"wrong"), ("smtp", b"also wrong")):
        login(checker, protocol_, wrong)
        clock.advance(10)
    refused = login(checker, "imap", b"secret")  # the address is blocked now
    clock.advance(10)
    assert refused[0].check(credError.UnauthorizedLogin)
    assert value(metrics, "twistmail_logins_total", protocol="imap", result="ok") == 1
    assert value(metrics, "twistmail_logins_total", protocol="pop3", result="failed") == 1
    assert value(metrics, "twistmail_logins_total", protocol="smtp", result="failed") == 1
    assert value(metrics, "twistmail_logins_total", protocol="imap", result="blocked") == 1
    assert value(metrics, "twistmail_auth_blocked_addresses_total") == 1


def test_an_unknown_protocol_name_is_counted_as_other(dataDir):
    addUser(dataDir, ALICE)
    metrics = Metrics()
    checker = PasswordChecker(Accounts(dataDir), defer.maybeDeferred, None, task.Clock(), metrics)
    [f] = login(checker, "gopher", b"wrong")
    assert f.check(credError.UnauthorizedLogin)
    assert value(metrics, "twistmail_logins_total", protocol="other", result="failed") == 1


# -- the relay ------------------------------------------------------------------------


class CountedWorld(World):
    def __init__(self, dataDir, **settings):
        self.metrics = Metrics()
        super().__init__(dataDir, **settings)

    def newRunner(self) -> QueueRunner:
        runner = QueueRunner(self.queue, Router(Accounts(self.dataDir), RelayPolicy([])),
                             LocalDelivery(MaildirStore(self.dataDir, defer.maybeDeferred)),
                             self.destination, self.sender, self.settings, self.clock,
                             self.metrics)
        self.metrics.watch(runner=runner)
        runner.startService()
        return runner


def test_relay_outcomes_are_counted_per_recipient(dataDir):
    w = CountedWorld(dataDir)
    outcomes = {"a@sent.test": SENT, "b@later.test": DEFERRED, "c@never.test": FAILED}
    replies = {SENT: "250 2.0.0 Ok", DEFERRED: "451 4.3.0 later", FAILED: "550 5.1.1 no"}
    w.sender.reply = lambda call: {r: Result(outcomes[r], replies[outcomes[r]], "mx.remote.test")
                                   for r in call.recipients}
    w.enqueue(list(outcomes))
    w.clock.advance(0)
    assert value(w.metrics, "twistmail_relay_recipients_total", result="delivered") == 2, \
        "a@sent.test, and the bounce to alice (local)"
    assert value(w.metrics, "twistmail_relay_recipients_total", result="deferred") == 1
    assert value(w.metrics, "twistmail_relay_recipients_total", result="bounced") == 1


def test_queue_size_and_oldest_age_are_read_at_scrape_time(dataDir):
    w = CountedWorld(dataDir)
    assert value(w.metrics, "twistmail_queue_messages") == 0
    assert value(w.metrics, "twistmail_queue_oldest_message_age_seconds") == 0
    w.sender.hold = True
    w.enqueue(["bob@remote.test"])
    w.clock.advance(60)
    w.enqueue(["carol@remote.test"])
    w.clock.advance(40)
    assert value(w.metrics, "twistmail_queue_messages") == 2
    assert value(w.metrics, "twistmail_queue_oldest_message_age_seconds") == pytest.approx(100)


class FakeDNS:
    """dns.resolver.Resolver's resolve(), answering from a dict or raising."""

    def __init__(self, answers):
        self.answers = answers

    def resolve(self, name, rdtype, **kw):
        answer = self.answers[name, rdtype]
        if isinstance(answer, Exception):
            raise answer
        return type("Answer", (), {"rrset": answer})()


def test_dns_lookups_are_timed_per_record_type_failures_included():
    import dns.resolver

    metrics = Metrics()
    resolver = DnsPythonMXResolver([("127.0.0.1", 53)], 5, defer.maybeDeferred, metrics)
    resolver._resolver = FakeDNS({("example.net", "MX"): [],
                                  ("gone.test", "MX"): dns.resolver.NXDOMAIN(),
                                  ("example.net", "TXT"): []})
    resolver.lookupMX("example.net")
    resolver.lookupMX("gone.test").addErrback(lambda f: f.trap(DNSFailure))
    resolver.lookupTXT("example.net")
    assert value(metrics, "twistmail_dns_lookup_seconds_count", type="MX") == 2
    assert value(metrics, "twistmail_dns_lookup_seconds_count", type="TXT") == 1
    assert value(metrics, "twistmail_dns_lookup_seconds_count", type="A") == 0


def test_delivery_attempts_are_timed_by_outcome():
    metrics = Metrics()
    sender = RelaySender(reactor, SenderSettings(heloName="relay.example.test", port=freePort(),
                                                 connectTimeout=5, commandTimeout=5),
                         metrics=metrics)
    results = onReactor(lambda: sender.send([Hop("mx.remote.test", ("127.0.0.1",))], "a@x.test",
                                            ["bob@remote.test"],
                                            lambda: defer.succeed(io.BytesIO(b"x\r\n")),
                                            {"id": "T1", "domain": "remote.test"}))
    assert results["bob@remote.test"].kind == DEFERRED  # connection refused
    assert value(metrics, "twistmail_relay_delivery_seconds_count", result="deferred") == 1
    assert value(metrics, "twistmail_relay_delivery_seconds_count", result="sent") == 0


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture
def serverTLS(tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    generateSelfSigned("mx.example.test", cert, key)
    return ServerTLS(cert, key)


def tlsServer(metrics, tls):
    return TLSMemoryBIOFactory(metrics.countHandshakes(tls), False,
                               protocol.Factory.forProtocol(protocol.Protocol))


def test_a_completed_tls_handshake_is_counted_once(serverTLS):
    from twisted.internet import ssl

    metrics = Metrics()
    server = tlsServer(metrics, serverTLS)
    client = TLSMemoryBIOFactory(ssl.CertificateOptions(), True,
                                 protocol.Factory.forProtocol(protocol.Protocol))
    c, s, pump = iosim.connectedServerAndClient(lambda: server.buildProtocol(PEER),
                                                lambda: client.buildProtocol(PEER))
    pump.flush()
    c.write(b"after the handshake")
    pump.flush()
    assert value(metrics, "twistmail_tls_handshakes_total", result="completed") == 1
    c.transport.loseConnection()
    pump.flush()
    assert value(metrics, "twistmail_tls_handshakes_total", result="completed") == 1
    assert value(metrics, "twistmail_tls_handshakes_total", result="failed") == 0


@pytest.mark.parametrize("sent", [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello", None])
def test_a_tls_handshake_that_does_not_complete_is_a_failure(serverTLS, sent):
    """Not TLS, a broken ClientHello, or nothing at all (a port scanner)."""
    metrics = Metrics()
    proto = tlsServer(metrics, serverTLS).buildProtocol(PEER)
    proto.makeConnection(StringTransport(peerAddress=PEER))
    if sent is not None:
        proto.dataReceived(sent)
    proto.connectionLost(protocol.connectionDone)
    assert value(metrics, "twistmail_tls_handshakes_total", result="failed") == 1
    assert value(metrics, "twistmail_tls_handshakes_total", result="completed") == 0


# -- the whole server, scraped ----------------------------------------------------------


def scrape(port: int, path: str = "/metrics", method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path)
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def samples(port: int) -> dict:
    response = scrape(port)
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.body.decode())
            for s in family.samples}


def test_the_server_counts_what_clients_did_and_serves_it_on_loopback(dataDir):
    addUser(dataDir, ALICE)
    port = freePort()
    server = startServer(dataDir, listen={"metrics": [f"tcp:{port}:interface=127.0.0.1"]})
    try:
        before = samples(port)
        with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("someone@remote.test")
            assert smtp.rcpt("nobody@example.test")[0] == 550
            assert smtp.rcpt(ALICE)[0] == 250
            assert smtp.data(b"Subject: hi\r\n\r\nhello\r\n")[0] == 250
        pop = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
        pop.user(ALICE)
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
        pop.quit()
        imap = imaplib.IMAP4("127.0.0.1", server.imapPort, timeout=10)
        imap.login(ALICE, "secret")
        imap.logout()
        after = samples(port)
    finally:
        server.stop()

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("twistmail_connections_total", listener="smtp") == 1
    assert moved("twistmail_connections_total", listener="pop3") == 1
    assert moved("twistmail_connections_total", listener="imap") == 1
    assert moved("twistmail_connections_total", listener="metrics") == 1
    assert moved("twistmail_smtp_messages_accepted_total", service="smtp") == 1
    assert moved("twistmail_smtp_rejections_total", service="smtp", code="550",
                 status="5.1.1") == 1
    assert moved("twistmail_logins_total", protocol="pop3", result="failed") == 1
    assert moved("twistmail_logins_total", protocol="imap", result="ok") == 1
    assert moved("twistmail_logins_total", protocol="imap", result="failed") == 0
    assert after[("twistmail_queue_messages", ())] == 0
    assert ("twistmail_connections_open", ()) in after


def test_the_metrics_listener_serves_nothing_else(dataDir):
    port = freePort()
    server = startServer(dataDir, listen={"metrics": [f"tcp:{port}:interface=127.0.0.1"]})
    try:
        assert scrape(port, "/").status == 404
        assert scrape(port, "/metrics/x").status == 404
        assert scrape(port, "/.well-known/mta-sts.txt").status == 404
        for method in ("POST", "HEAD", "OPTIONS", "SCRIPT"):
            refused = scrape(port, "/metrics", method)
            assert (refused.status, refused.getheader("allow")) == (405, "GET"), method
            assert method.encode() not in refused.body  # not reflected in text/html
        assert scrape(port, "/metrics", "<script>").status == 400  # not a method (Twisted)
        assert scrape(port, "/metrics/").status == 200
    finally:
        server.stop()
