"""Fetching and caching recipient domains' MTA-STS policies (RFC 8461 §3.3, §5.1).

A loopback HTTPS server (twisted.web) answers for mta-sts.<domain> with a
certificate from a test CA; the test DNS server says where it is and
publishes the _mta-sts TXT records (TTL 0, so a changed id is seen at once).
"""

from __future__ import annotations

import os

import pytest
from certs import makeCerts
from dnsserver import A, startDNS
from hostile import logged  # noqa: F401 - a fixture
from stsserver import POLICY, TXT, startPolicyServer
from support import onReactor
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.logger import formatEvent

from twistmail.mtasts import MAX_POLICY_BYTES
from twistmail.relay.mx import DnsPythonMXResolver
from twistmail.relay.sender import trustRootFromFile
from twistmail.relay.stspolicy import FetchError, PolicyFetcher, PolicySource


class Env:
    def __init__(self, tmp_path) -> None:
        self.certs = makeCerts("mta-sts.sts.test")
        caFile = tmp_path / "ca.pem"
        caFile.write_bytes(self.certs.caPEM)
        self.trustRoot = trustRootFromFile(str(caFile))
        self.dns = startDNS({
            "_mta-sts.sts.test": [TXT("v=STSv1; id=one")],
            "mta-sts.sts.test": [A("127.0.0.1")],
            "_mta-sts.wrong.test": [TXT("v=STSv1; id=one")],
            "mta-sts.wrong.test": [A("127.0.0.1")],  # the same server: its cert names sts.test
            "nosts.test": [A("127.0.0.1")],
        })
        self.resolver = DnsPythonMXResolver([("127.0.0.1", self.dns.port)], 2,
                                            threads.deferToThread)
        self.server = startPolicyServer(self.certs)
        self.policy = self.server.resource
        self.port = self.server.port
        self.cacheDir = str(tmp_path / "mta-sts")
        self.now = 1_000_000.0

    def fetcher(self, clock=None, timeout=30) -> PolicyFetcher:
        return PolicyFetcher(reactor, self.resolver, port=self.port, trustRoot=self.trustRoot,
                             timeout=timeout, clock=clock or reactor)

    def source(self) -> PolicySource:
        return PolicySource(self.resolver, self.fetcher(), self.cacheDir, threads.deferToThread,
                            now=lambda: self.now)

    def setId(self, id: str) -> None:
        self.dns.resolver.zone["_mta-sts.sts.test"] = [TXT(f"v=STSv1; id={id}")]

    def stop(self) -> None:
        self.server.stop()
        self.dns.stop()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.stop()


def failure(d: defer.Deferred):
    """Wait for C{d} and return the exception it failed with (AssertionError if it did not)."""
    result = onReactor(lambda: d.addCallbacks(lambda r: ("ok", r), lambda f: ("failed", f.value)))
    assert result[0] == "failed", f"expected a failure, got {result[1]!r}"
    return result[1]


# -- the fetch (RFC 8461 §3.3) -----------------------------------------------------


def test_valid_policy_is_fetched_over_verified_https_via_our_resolver(env):
    body = onReactor(env.fetcher().fetch, "sts.test")
    assert body == POLICY
    assert env.policy.requests == [b"mta-sts.sts.test"]  # Host: the name, not our port
    # The host name was resolved by the relay's DNS server, not /etc/hosts or the system's.
    assert ("mta-sts.sts.test", "A") in env.dns.queries


def test_redirect_is_not_followed(env):
    env.policy.mode = "redirect"
    error = failure(env_fetch(env))
    assert isinstance(error, FetchError) and "301" in str(error)
    assert len(env.policy.requests) == 1


def test_non_2xx_is_refused(env):
    env.policy.code = 404
    error = failure(env_fetch(env))
    assert isinstance(error, FetchError) and "404" in str(error)


def test_wrong_content_type_is_refused(env):
    env.policy.contentType = b"text/html"
    error = failure(env_fetch(env))
    assert isinstance(error, FetchError) and "text/html" in str(error)


def test_endless_body_stops_at_64_kib(env):
    env.policy.mode = "stream"
    error = failure(env_fetch(env))
    assert isinstance(error, FetchError) and "65536" in str(error)
    onReactor(lambda: env.policy.closed)  # we hung up: the server stops streaming


def test_slow_server_times_out_and_the_connection_is_closed(env):
    env.policy.mode = "hang"
    clock = task.Clock()
    fetcher = env.fetcher(clock=clock, timeout=30)
    pending = []
    onReactor(lambda: pending.append(fetcher.fetch("sts.test")))
    onReactor(lambda: env.policy.arrived)  # the request is in; the server never answers
    onReactor(clock.advance, 29)
    assert not pending[0].called
    onReactor(clock.advance, 1)
    error = failure(pending[0])
    assert isinstance(error, FetchError) and "timed out" in str(error)
    onReactor(lambda: env.policy.closed)


def test_certificate_for_another_name_is_refused(env):
    error = failure(env_fetch(env, "wrong.test"))
    assert isinstance(error, FetchError)
    assert env.policy.requests == []  # the request was never sent


def env_fetch(env, domain="sts.test"):
    d = []
    onReactor(lambda: d.append(env.fetcher().fetch(domain)))
    return d[0]


# -- the policy source and its cache (RFC 8461 §5.1) ---------------------------------


def policyFor(source, domain="sts.test"):
    return onReactor(source.policyFor, domain)


def test_policy_for_a_domain_with_a_record(env):
    policy = policyFor(env.source())
    assert (policy.mode, policy.mx, policy.maxAge, policy.id) == (
        "enforce", ("mx.sts.test",), 86400, "one")


def test_no_record_means_no_policy_and_no_fetch(env):
    assert policyFor(env.source(), "nosts.test") is None
    assert policyFor(env.source(), "nxdomain.test") is None
    assert env.policy.requests == []


def test_same_id_uses_the_cache_without_a_request(env):
    source = env.source()
    policyFor(source)
    policyFor(source)
    assert len(env.policy.requests) == 1


def test_the_usual_outcomes_log_no_line_per_message(env, logged):  # noqa: F811
    """The cached policy, or no record and none cached: what every delivery sees."""
    source = env.source()
    policyFor(source)
    policyFor(source, "nosts.test")
    logged.clear()
    policyFor(source)
    policyFor(source, "nosts.test")
    assert [formatEvent(e) for e in logged if "mta-sts" in formatEvent(e)] == []


def cachedThenNewId(env) -> PolicySource:
    """A source that has fetched and cached policy "one"; the TXT record now says "two"."""
    source = env.source()
    policyFor(source)
    env.setId("two")
    return source


def test_changed_id_refetches(env):
    source = cachedThenNewId(env)
    env.policy.body = POLICY.replace(b"enforce", b"testing")
    policy = policyFor(source)
    assert (policy.mode, policy.id) == ("testing", "two")
    assert len(env.policy.requests) == 2


def test_failed_refetch_keeps_the_cached_policy(env, logged):  # noqa: F811
    source = cachedThenNewId(env)
    env.policy.code = 500  # an attacker blocking the new fetch cannot downgrade us
    policy = policyFor(source)
    assert (policy.mode, policy.id) == ("enforce", "one")
    assert len(env.policy.requests) == 2
    lines = [formatEvent(e) for e in logged]
    assert "mta-sts domain=sts.test result=enforce id=one max_age=86400 source=fetched" in lines
    assert "mta-sts domain=sts.test result=fetch-failed detail=HTTP 500 using=cached-enforce" \
        in lines


def test_invalid_new_policy_keeps_the_cached_one(env):
    source = cachedThenNewId(env)
    env.policy.body = b"version: STSv1\r\nmode: none-of-these\r\nmax_age: 1\r\n"
    assert policyFor(source).id == "one"


def test_record_gone_or_dns_failing_keeps_the_cached_policy(env):
    source = env.source()
    policyFor(source)
    del env.dns.resolver.zone["_mta-sts.sts.test"]  # stripped by an attacker on path
    assert policyFor(source).mode == "enforce"
    env.dns.resolver.servfail.add("_mta-sts.sts.test")
    assert policyFor(source).mode == "enforce"
    assert len(env.policy.requests) == 1


def test_expired_policy_is_not_used(env):
    source = env.source()
    policyFor(source)
    env.now += 86401  # past max_age
    env.policy.code = 500
    assert policyFor(source) is None  # the record is there, the fetch fails, nothing cached


def test_disk_cache_survives_a_new_instance(env):
    policyFor(env.source())
    assert os.listdir(env.cacheDir) == ["sts.test.json"]
    env.policy.code = 500
    fresh = env.source()  # a restarted server: empty memory
    assert policyFor(fresh).mode == "enforce"
    assert len(env.policy.requests) == 1  # same id: not even asked


def test_concurrent_lookups_share_one_fetch(env):
    source = env.source()
    both = onReactor(lambda: defer.gatherResults([source.policyFor("sts.test"),
                                                  source.policyFor("sts.test")]))
    assert both[0] == both[1] and both[0].mode == "enforce"
    assert len(env.policy.requests) == 1


def test_a_hostile_domain_name_is_never_a_path_or_url(env):
    for domain in ("../../etc", "sts.test/x", "a b.test", "", "x" * 300 + ".test"):
        assert policyFor(env.source(), domain) is None
    assert not os.path.exists(env.cacheDir) or os.listdir(env.cacheDir) == []


class EndlessHeaders(protocol.Protocol):
    """An HTTPS server that never finishes its response headers."""

    def connectionMade(self):
        self.factory.connected.callback(None) if not self.factory.connected.called else None
        self.transport.write(b"HTTP/1.1 200 OK\r\n")
        self.more()

    def more(self):
        if self.factory.lost.called:
            return
        self.transport.write(b"X-Filler: " + b"x" * 1000 + b"\r\n")
        self.factory.sent += 1012
        reactor.callLater(0.0005, self.more)

    def connectionLost(self, reason):
        if not self.factory.lost.called:
            self.factory.lost.callback(None)


def test_endless_headers_are_cut_off(env):
    factory = protocol.ServerFactory.forProtocol(EndlessHeaders)
    factory.connected, factory.lost, factory.sent = defer.Deferred(), defer.Deferred(), 0
    onReactor(env.server.listening.stopListening)
    env.server.listening = onReactor(reactor.listenSSL, env.port, factory,
                                     env.certs.serverOptions(), interface="127.0.0.1")
    error = failure(env_fetch(env))
    assert isinstance(error, FetchError)
    onReactor(lambda: factory.lost)  # we hung up, long before the 30 s timeout
    assert factory.sent < 16 * MAX_POLICY_BYTES, factory.sent
