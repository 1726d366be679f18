"""The dnsbl filter: DNS block lists checked at connect, through the shared resolver,
against a real DNS server on loopback."""

from __future__ import annotations

import ipaddress
import time

import pytest
from dnsserver import A, startDNS
from support import onReactor
from twisted.internet import reactor, threads
from zope.interface.verify import verifyObject

from twistmail import config
from twistmail._pluginload import find
from twistmail.filters.dnsbl import queryName
from twistmail.interfaces import IMessageFilter, IMessageFilterFactory
from twistmail.model import FilterContext, SessionInfo, Verdict
from twistmail.relay.mx import DnsPythonMXResolver

ZONE = {
    # 192.0.2.99 is on both lists; 192.0.2.10 on the second only.
    "99.2.0.192.bl.example": [A("127.0.0.2")],
    "99.2.0.192.bl2.example": [A("127.0.0.4")],
    "10.2.0.192.bl2.example": [A("127.0.0.10")],
    # Spamhaus's "query refused" code for queries from public resolvers: not a listing.
    "20.2.0.192.bl.example": [A("127.255.255.254")],
    # A resolver that rewrites NXDOMAIN to an ad server's address: not a listing either.
    "30.2.0.192.bl.example": [A("198.51.100.7")],
    # 2001:db8::99, nibbles reversed.
    "9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example": [A("127.0.0.2")],
    "bl.example": [], "bl2.example": [],
}


@pytest.fixture(scope="module")
def dnsServer():
    server = startDNS(ZONE, servfail={"40.2.0.192.bl.example"}, hang={"50.2.0.192.bl2.example"})
    yield server
    server.stop()


def makeFilter(dnsServer, tmp_path, zones=("bl.example", "bl2.example"), timeout=2, **antispam):
    settings = config.load(None, {"antispam": {"dnsbl": list(zones), **antispam},
                                  "relay": {"trusted_networks": ["203.0.113.0/24"]}})
    resolver = DnsPythonMXResolver([("127.0.0.1", dnsServer.port)], timeout, threads.deferToThread)
    context = FilterContext("mx.example.org", str(tmp_path), resolver, reactor, settings)
    factory = find(IMessageFilterFactory, "dnsbl", "[filters] inbound", "filter")
    return factory.makeFilter({}, context)


def connect(filt, client: str, **fields) -> Verdict | None:
    return onReactor(lambda: threads.defer.maybeDeferred(
        filt.connect, SessionInfo("inbound", client, **fields)))


def test_the_builtin_plugin_provides_the_interfaces(dnsServer, tmp_path):
    factory = find(IMessageFilterFactory, "dnsbl", "[filters] inbound", "filter")
    assert verifyObject(IMessageFilterFactory, factory)
    assert verifyObject(IMessageFilter, makeFilter(dnsServer, tmp_path))


def test_a_listed_client_is_refused_with_554_naming_the_first_list(dnsServer, tmp_path):
    verdict = connect(makeFilter(dnsServer, tmp_path), "192.0.2.99")
    assert verdict == Verdict.reject(
        "5.7.1 Service unavailable; client [192.0.2.99] blocked using bl.example", 554)


def test_every_list_is_asked_and_a_listing_on_any_of_them_counts(dnsServer, tmp_path):
    verdict = connect(makeFilter(dnsServer, tmp_path), "192.0.2.10")
    assert verdict.code == 554 and verdict.text.endswith("blocked using bl2.example")


def test_an_ipv4_mapped_ipv6_client_is_looked_up_as_ipv4(dnsServer, tmp_path):
    verdict = connect(makeFilter(dnsServer, tmp_path), "::ffff:192.0.2.99")
    assert verdict.code == 554 and "[192.0.2.99]" in verdict.text


def test_an_ipv6_client_is_looked_up_by_reversed_nibbles(dnsServer, tmp_path):
    verdict = connect(makeFilter(dnsServer, tmp_path, zones=["bl.example"]), "2001:db8::99")
    assert verdict.code == 554 and "[2001:db8::99]" in verdict.text


@pytest.mark.parametrize("client", [
    "192.0.2.1",  # NXDOMAIN: not listed
    "192.0.2.20",  # 127.255.255.254: the list refused the query
    "192.0.2.30",  # an answer outside 127/8
    "192.0.2.40",  # SERVFAIL: DNS errors never block
    "",  # a local program: no address
])
def test_no_listing_no_refusal_or_error_means_no_block(dnsServer, tmp_path, client):
    assert connect(makeFilter(dnsServer, tmp_path), client) is None


@pytest.mark.parametrize("client, fields, allow", [
    ("192.0.2.99", {"authenticated": "alice@example.org"}, []),
    ("203.0.113.5", {}, []),  # [relay] trusted_networks
    ("192.0.2.99", {}, ["192.0.2.96/29"]),  # [antispam] allow
])
def test_allowed_trusted_and_authenticated_clients_are_not_looked_up(dnsServer, tmp_path,
                                                                      client, fields, allow):
    filt = makeFilter(dnsServer, tmp_path, allow=allow)
    before = len(dnsServer.queries)
    assert connect(filt, client, **fields) is None
    assert len(dnsServer.queries) == before


def test_off_by_default_nothing_is_looked_up(dnsServer, tmp_path):
    filt = makeFilter(dnsServer, tmp_path, zones=[])
    before = len(dnsServer.queries)
    assert connect(filt, "192.0.2.99") is None
    assert len(dnsServer.queries) == before


def test_a_bad_zone_names_the_key_and_the_fix():
    with pytest.raises(config.ConfigError, match=r"\[antispam\] dnsbl.*Fix"):
        config.load(None, {"antispam": {"dnsbl": ["not a zone"]}})


def test_a_list_that_never_answers_costs_one_dns_timeout_and_blocks_nothing(dnsServer, tmp_path):
    filt = makeFilter(dnsServer, tmp_path, timeout=1)
    started = time.monotonic()
    assert connect(filt, "192.0.2.50") is None  # bl2.example never answers for it
    assert time.monotonic() - started < 5


def test_query_names_follow_rfc_5782():
    assert queryName(ipaddress.ip_address("192.0.2.1"), "zen.spamhaus.org") == \
        "1.2.0.192.zen.spamhaus.org"
    assert queryName(ipaddress.ip_address("2001:db8::1"), "bl.example") == \
        "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.example"
