"""MX resolution: dnspython against a real DNS server on loopback, and hop ordering with a fake."""

from __future__ import annotations

import random
import socket
import time

import pytest
from dnsserver import AAAA, MX, TXT, A, startDNS
from support import onReactor
from twisted.internet import defer, threads
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistmail.interfaces import IMXResolver
from twistmail.relay.mx import (
    AnswerCache,
    DestinationCache,
    DNSFailure,
    DnsPythonMXResolver,
    Hop,
    orderMX,
    resolveHops,
    resolveSmarthost,
)

ZONE = {
    "example.net": [MX(10, "mx1.example.net"), MX(20, "mx2.example.net")],
    "mx1.example.net": [A("127.0.0.2")],
    "mx2.example.net": [AAAA("::1"), A("127.0.0.3")],
    "implicit.test": [A("127.0.0.4"), AAAA("::1")],
    "nomail.test": [MX(0, "")],
    "nothing.test": [],  # exists, but no MX, A or AAAA
    "lame.test": [MX(10, "gone.lame.test")],
    "_mta-sts.example.net": [TXT("v=STSv1; ", "id=2024"), TXT("unrelated")],
}


@pytest.fixture(scope="module")
def dnsServer():
    server = startDNS(ZONE, servfail={"broken.test"}, hang={"slow.test"})
    yield server
    server.stop()


def resolver(server, timeout=2) -> DnsPythonMXResolver:
    return DnsPythonMXResolver([("127.0.0.1", server.port)], timeout, threads.deferToThread)


def resolve(server, domain, timeout=2):
    r = resolver(server, timeout)
    return onReactor(lambda: resolveHops(r, domain, random.Random(1)))


def failure(server, domain, timeout=2) -> DNSFailure:
    with pytest.raises(DNSFailure) as info:
        resolve(server, domain, timeout)
    return info.value


def test_resolver_provides_the_interface(dnsServer):
    assert verifyObject(IMXResolver, resolver(dnsServer))


def test_mx_records_in_preference_order_with_ipv6_and_ipv4_addresses(dnsServer):
    hops = resolve(dnsServer, "example.net")
    assert hops == [Hop("mx1.example.net", ("127.0.0.2",), 10, viaMX=True),
                    Hop("mx2.example.net", ("::1", "127.0.0.3"), 20, viaMX=True)]


def test_txt_records_have_their_strings_joined(dnsServer):
    r = resolver(dnsServer)
    texts = onReactor(lambda: r.lookupTXT("_mta-sts.example.net"))
    assert sorted(texts) == ["unrelated", "v=STSv1; id=2024"]
    assert onReactor(lambda: r.lookupTXT("example.net")) == []  # NODATA
    with pytest.raises(DNSFailure) as info:
        onReactor(lambda: r.lookupTXT("_mta-sts.nowhere.test"))
    assert not info.value.temporary


def test_no_mx_means_the_domain_itself_is_the_mx(dnsServer):
    assert resolve(dnsServer, "implicit.test") == [Hop("implicit.test", ("::1", "127.0.0.4"), 0)]


def test_null_mx_is_a_permanent_failure(dnsServer):
    e = failure(dnsServer, "nomail.test")
    assert not e.temporary and e.status == "5.1.10" and "null MX" in e.text


def test_nxdomain_is_permanent(dnsServer):
    e = failure(dnsServer, "no-such-domain.test")
    assert not e.temporary and e.status == "5.1.2" and "NXDOMAIN" in e.text
    assert e.reply.startswith("550 5.1.2 ")


def test_no_mx_and_no_address_is_permanent(dnsServer):
    e = failure(dnsServer, "nothing.test")
    assert not e.temporary and "no MX, A or AAAA" in e.text


def test_servfail_is_temporary(dnsServer):
    e = failure(dnsServer, "broken.test")
    assert e.temporary and e.status == "4.4.3" and "SERVFAIL" in e.text
    assert e.reply.startswith("451 4.4.3 ")


def test_timeout_is_temporary_and_bounded(dnsServer):
    started = time.monotonic()
    e = failure(dnsServer, "slow.test", timeout=1)
    assert e.temporary and "timed out" in e.text
    assert time.monotonic() - started < 5


def test_mx_host_without_address_is_temporary(dnsServer):
    e = failure(dnsServer, "lame.test")
    assert e.temporary and "gone.lame.test" in e.text


def test_lookups_do_not_block_the_reactor(dnsServer):
    """While a lookup waits for its timeout, the reactor keeps serving."""
    r = resolver(dnsServer, timeout=2)
    done = []
    onReactor(lambda: [r.lookupMX("slow.test").addBoth(done.append)])
    ticks = []
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        ticks.append(onReactor(time.monotonic))
    assert len(ticks) > 10 and not done


def test_server_unreachable_is_temporary():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives, never answers
        r = DnsPythonMXResolver([silent.getsockname()], 1, threads.deferToThread)
        with pytest.raises(DNSFailure) as info:
            onReactor(lambda: resolveHops(r, "example.net", random.Random()))
    assert info.value.temporary


# -- ordering, with a fake resolver -------------------------------------------------


@implementer(IMXResolver)
class FakeResolver:
    def __init__(self, mx: dict, addresses: dict) -> None:
        self.mx, self.addresses = mx, addresses

    def lookupMX(self, domain):
        value = self.mx.get(domain, [])
        return defer.fail(value) if isinstance(value, Exception) else defer.succeed(value)

    def lookupAddresses(self, host):
        value = self.addresses.get(host, [])
        return defer.fail(value) if isinstance(value, Exception) else defer.succeed(value)


def hopsOf(d) -> list:
    result = []
    d.addBoth(result.append)
    return result[0]


def test_equal_preferences_are_shuffled_lower_preference_first():
    records = [(20, "c"), (10, "a1"), (10, "a2"), (10, "a3"), (30, "d")]
    seen = set()
    for seed in range(50):
        ordered = orderMX(records, random.Random(seed))
        assert [p for p, _ in ordered] == [10, 10, 10, 20, 30]
        assert ordered[3:] == [(20, "c"), (30, "d")]
        seen.add(tuple(h for _, h in ordered[:3]))
    assert len(seen) == 6  # every order of the three equal ones occurs


def test_unresolvable_mx_host_is_skipped():
    fake = FakeResolver({"d.test": [(10, "bad.d.test"), (20, "good.d.test")]},
                        {"bad.d.test": DNSFailure(True, "4.4.3", "SERVFAIL"),
                         "good.d.test": ["192.0.2.1"]})
    assert hopsOf(resolveHops(fake, "d.test", random.Random())) == [Hop("good.d.test", ("192.0.2.1",), 20, viaMX=True)]


def test_null_mx_among_others_is_ignored():
    fake = FakeResolver({"d.test": [(0, ""), (10, "mx.d.test")]}, {"mx.d.test": ["192.0.2.1"]})
    assert hopsOf(resolveHops(fake, "d.test", random.Random())) == [Hop("mx.d.test", ("192.0.2.1",), 10, viaMX=True)]


def test_mx_that_is_an_address_literal_is_used_as_is():
    fake = FakeResolver({"d.test": [(10, "192.0.2.7")]}, {})
    assert hopsOf(resolveHops(fake, "d.test", random.Random())) == [Hop("192.0.2.7", ("192.0.2.7",), 10, viaMX=True)]


def test_smarthost_skips_mx_lookup():
    fake = FakeResolver({"relay.test": [(10, "elsewhere.test")]}, {"relay.test": ["192.0.2.9"]})
    assert hopsOf(resolveSmarthost(fake, "relay.test")) == [Hop("relay.test", ("192.0.2.9",))]
    assert hopsOf(resolveSmarthost(fake, "::1")) == [Hop("::1", ("::1",))]
    assert isinstance(hopsOf(resolveSmarthost(fake, "none.test")).value, DNSFailure)


def test_mta_sts_enforce_keeps_only_listed_mx_hosts():
    from twistmail.mtasts import Policy
    from twistmail.relay.mx import DNSFailure, Hop, applyPolicy

    hops = [Hop("mx1.example.test", ("127.0.0.1",)), Hop("evil.attacker.test", ("127.0.0.2",))]
    enforce = Policy("enforce", ("*.example.test",), 86400)
    [kept] = applyPolicy(hops, enforce, "example.test")
    assert kept.host == "mx1.example.test" and kept.policy is enforce
    with pytest.raises(DNSFailure) as e:
        applyPolicy(hops[1:], enforce, "example.test")
    assert e.value.temporary and e.value.status == "4.7.5" and "MTA-STS" in e.value.text
    testing = Policy("testing", ("*.example.test",), 86400)
    assert [h.host for h in applyPolicy(hops, testing, "example.test")] == \
        ["mx1.example.test", "evil.attacker.test"]
    assert applyPolicy(hops, None, "example.test") == hops


def test_cached_answers_are_given_without_a_worker_thread_until_their_ttl_ends(dnsServer):
    """A delivery to a domain looked up a moment ago costs no thread hop (the relay's hot path)."""
    ran = []

    def run(f, *args):
        ran.append(args)
        return threads.deferToThread(f, *args)

    r = DnsPythonMXResolver([("127.0.0.1", dnsServer.port)], 2, run)
    first = onReactor(lambda: resolveHops(r, "example.net", random.Random(1)))
    assert ran == [("example.net",), ("mx1.example.net",), ("mx2.example.net",)]
    with pytest.raises(DNSFailure):
        onReactor(lambda: resolveHops(r, "unknown.test", random.Random(1)))
    ran.clear()
    queries = len(dnsServer.queries)
    assert onReactor(lambda: resolveHops(r, "example.net", random.Random(1))) == first
    with pytest.raises(DNSFailure) as nx:  # a cached NXDOMAIN, too
        onReactor(lambda: resolveHops(r, "unknown.test", random.Random(1)))
    assert not nx.value.temporary
    assert ran == [] and len(dnsServer.queries) == queries
    for node in r._resolver.cache.data.values():  # every TTL has run out
        node.value.expiration = time.time() - 1
    r._memo = {key: (found, time.time() - 1) for key, (found, _) in r._memo.items()}
    assert onReactor(lambda: resolveHops(r, "example.net", random.Random(1))) == first
    with pytest.raises(DNSFailure):
        onReactor(lambda: resolveHops(r, "unknown.test", random.Random(1)))
    assert ran == [("example.net",), ("mx1.example.net",), ("mx2.example.net",),
                   ("unknown.test",)]


class CountingDestination:
    """destination(domain) answering from C{answers} (a list of hops or an exception),
    counting the calls; with C{hold}, each answer waits until released."""

    def __init__(self, answers: dict, hold: bool = False) -> None:
        self.answers, self.hold, self.calls, self.held = answers, hold, [], []

    def __call__(self, domain):
        self.calls.append(domain)
        value = self.answers[domain]
        d = defer.fail(value) if isinstance(value, Exception) else defer.succeed(list(value))
        if self.hold:
            held = defer.Deferred()
            self.held.append(lambda: d.chainDeferred(held))
            return held
        return d


def test_destination_cache_reuses_an_answer_until_it_expires():
    from twisted.internet.task import Clock

    clock = Clock()
    hops = [Hop("mx.d.test", ("192.0.2.1",), 10)]
    fake = CountingDestination({"d.test": hops, "e.test": [Hop("mx.e.test", ("192.0.2.2",), 10)]})
    cache = DestinationCache(fake, clock.seconds, random.Random(1), cacheTime=5)
    assert hopsOf(cache("d.test")) == hops
    clock.advance(4.9)
    assert hopsOf(cache("d.test")) == hops
    assert hopsOf(cache("e.test"))[0].host == "mx.e.test"
    assert fake.calls == ["d.test", "e.test"]
    clock.advance(0.2)  # d.test's answer is 5.1 seconds old: asked again
    fake.answers["d.test"] = [Hop("mx2.d.test", ("192.0.2.3",), 10)]
    assert hopsOf(cache("d.test"))[0].host == "mx2.d.test"
    assert fake.calls == ["d.test", "e.test", "d.test"]


def test_destination_cache_keeps_no_failure():
    from twisted.internet.task import Clock

    clock = Clock()
    fake = CountingDestination({"d.test": DNSFailure(True, "4.4.3", "SERVFAIL")})
    cache = DestinationCache(fake, clock.seconds, random.Random(1))
    assert hopsOf(cache("d.test")).check(DNSFailure)
    fake.answers["d.test"] = [Hop("mx.d.test", ("192.0.2.1",), 10)]
    assert hopsOf(cache("d.test"))[0].host == "mx.d.test"
    assert fake.calls == ["d.test", "d.test"]


def test_destination_cache_asks_once_for_overlapping_lookups():
    from twisted.internet.task import Clock

    fake = CountingDestination({"d.test": [Hop("mx.d.test", ("192.0.2.1",), 10)]}, hold=True)
    cache = DestinationCache(fake, Clock().seconds, random.Random(1))
    waiting = [cache("d.test") for _ in range(3)]
    assert fake.calls == ["d.test"]
    fake.held[0]()
    assert [hopsOf(d)[0].host for d in waiting] == ["mx.d.test"] * 3


def test_destination_cache_shuffles_equal_preferences_on_every_use():
    from twisted.internet.task import Clock

    hops = [Hop("a1", ("192.0.2.1",), 10), Hop("a2", ("192.0.2.2",), 10),
            Hop("b", ("192.0.2.3",), 20)]
    cache = DestinationCache(CountingDestination({"d.test": hops}), Clock().seconds,
                             random.Random(1))
    orders = {tuple(h.host for h in hopsOf(cache("d.test"))) for _ in range(30)}
    assert orders == {("a1", "a2", "b"), ("a2", "a1", "b")}


def test_filter_lookups_are_answered_from_the_answer_cache_until_the_ttl_ends(dnsServer):
    """resolveSync (SPF, DKIM, DMARC, DNSBL) asks the server once per name and type per TTL."""
    r = resolver(dnsServer)
    queries = len(dnsServer.queries)
    first = r.resolveSync("_mta-sts.example.net", "TXT")
    assert r.resolveSync("_MTA-STS.example.net", "TXT") == first  # names are case-insensitive
    assert r.resolveSync("nothing.test", "MX") == []  # NODATA is an answer too
    assert r.resolveSync("nothing.test", "MX") == []
    assert len(dnsServer.queries) == queries + 2
    with pytest.raises(DNSFailure):
        r.resolveSync("broken.test", "TXT")
    with pytest.raises(DNSFailure):  # a failure is never kept
        r.resolveSync("broken.test", "TXT")
    assert len(dnsServer.queries) >= queries + 4
    queries = len(dnsServer.queries)
    for node in r._resolver.cache.data.values():  # every TTL has run out
        node.value.expiration = time.time() - 1
    r._answers._entries = {key: (found, time.time() - 1)
                           for key, (found, _) in r._answers._entries.items()}
    assert r.resolveSync("_mta-sts.example.net", "TXT") == first
    assert len(dnsServer.queries) == queries + 1


def test_answer_cache_honours_the_ttl_and_its_size():
    now = [1000.0]
    cache = AnswerCache(size=3, clock=lambda: now[0])
    cache.put("a.test", "TXT", ["a"], 1060)
    assert cache.get("a.test", "TXT") == ["a"]
    assert cache.get("a.test", "MX") is None
    now[0] = 1060
    assert cache.get("a.test", "TXT") is None  # the TTL has run out
    cache.put("b.test", "TXT", ["b"], 2000)
    cache.put("c.test", "TXT", ["c"], 2000)
    cache.put("d.test", "TXT", ["d"], 2000)  # full: the expired a.test goes first
    assert len(cache) == 3 and cache.get("b.test", "TXT") == ["b"]
    cache.put("e.test", "TXT", ["e"], 2000)  # full, nothing expired: the oldest goes
    assert len(cache) == 3
    assert cache.get("b.test", "TXT") is None
    assert [cache.get(n, "TXT") for n in ("c.test", "d.test", "e.test")] == [["c"], ["d"], ["e"]]
    cache.put("e.test", "TXT", ["e2"], 2000)  # a new answer replaces the old one
    assert len(cache) == 3 and cache.get("e.test", "TXT") == ["e2"]
