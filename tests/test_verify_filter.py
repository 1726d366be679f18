"""Inbound SPF, DKIM and DMARC verification (the "spf-dkim-dmarc" filter).

The filter's hooks are called as the SMTP engine calls them, with DNS from a
twisted.names server on loopback through the relay's real resolver.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from dnsserver import PTR, TXT, A, startDNS
from mailauth import (
    HOST,
    Ed25519Key,
    RSAKey,
    authResults,
    filterMessage,
    makeVerifier,
    message,
    resolverFor,
    runHook,
    session,
    sign,
)
from support import onReactor
from twisted.internet import defer, reactor, threads
from zope.interface.verify import verifyObject

from twistmail import _pluginload
from twistmail.config import ConfigError
from twistmail.filters import dmarc
from twistmail.filters.dkimprocess import DKIMProcesses
from twistmail.filters.lookups import CachedLookups
from twistmail.filters.spfdkimdmarc import (
    INLINE_SIZE,
    SpfDkimDmarcFactory,
    fromDomains,
    fromValues,
)
from twistmail.interfaces import IMessageFilter, IMessageFilterFactory
from twistmail.model import ACCEPT, QUARANTINE, REJECT, FilterContext, FilterMessage
from twistmail.relay.mx import DNSFailure, DnsPythonMXResolver, NotCached

RSA = RSAKey()
ED = Ed25519Key()


def zone() -> dict:
    return {
        # A domain doing everything right: SPF for its outgoing host, two DKIM keys
        # (RSA and Ed25519, RFC 8463) and DMARC p=reject.
        "good.example": [TXT("v=spf1 ip4:192.0.2.10 -all")],
        "mail.good.example": [A("192.0.2.10"), TXT("v=spf1 a -all")],
        "bounces.good.example": [TXT("v=spf1 ip4:192.0.2.10 -all")],
        "rsa._domainkey.good.example": [RSA.record()],
        "ed._domainkey.good.example": [ED.record()],
        "_dmarc.good.example": [TXT("v=DMARC1; p=reject; rua=mailto:d@good.example")],
        # Strict SPF alignment.
        "strict.example": [TXT("v=spf1 include:good.example -all")],
        "_dmarc.strict.example": [TXT("v=DMARC1; p=reject; aspf=s")],
        "bounces.strict.example": [TXT("v=spf1 ip4:192.0.2.10 -all")],
        # A sender whose own SPF passes, forging another domain's From.
        "evil.example": [TXT("v=spf1 ip4:192.0.2.66 -all")],
        "quarantine.example": [],
        "_dmarc.quarantine.example": [TXT("v=DMARC1; p=quarantine")],
        "sampled.example": [],
        "_dmarc.sampled.example": [TXT("v=DMARC1; p=reject; pct=0")],
        "relaxed.example": [],
        "_dmarc.relaxed.example": [TXT("v=DMARC1; p=reject; sp=none")],
        "news.relaxed.example": [],
        # The organizational domain comes from the Public Suffix List: co.uk is a
        # public suffix, so a From of mail.shop.example.co.uk falls back to
        # _dmarc.example.co.uk (RFC 7489 §6.6.3), never to _dmarc.co.uk.
        "mail.shop.example.co.uk": [],
        "_dmarc.example.co.uk": [TXT("v=DMARC1; p=reject")],
        "_dmarc.co.uk": [TXT("v=DMARC1; p=none")],
        # SPF with ptr and macros (RFC 7208 §5.5, §7).
        "ptr.example": [TXT("v=spf1 ptr -all")],
        "host.ptr.example": [A("192.0.2.20")],
        "20.2.0.192.in-addr.arpa": [PTR("host.ptr.example")],
        "macro.example": [TXT("v=spf1 exists:%{ir}.%{l1r+-}._spf.%{d} -all")],
        "20.2.0.192.carol._spf.macro.example": [A("127.0.0.2")],
        # DNS that fails temporarily, for a domain publishing p=reject.
        "tempfail.example": [],
        "_dmarc.tempfail.example": [TXT("v=DMARC1; p=reject")],
    }


@pytest.fixture(scope="module")
def dnsServer():
    server = startDNS(zone(), servfail={"tempfail.example", "rsa._domainkey.tempfail.example"})
    yield server
    server.stop()


def signedGood(raw=None) -> bytes:
    raw = raw or message()
    return sign(sign(raw, RSA, "good.example", "rsa"), ED, "good.example", "ed")


# -- the plugin ---------------------------------------------------------------------


def test_found_by_name_as_a_plugin(dnsServer):
    factory = _pluginload.find(IMessageFilterFactory, "spf-dkim-dmarc", "[filters] inbound")
    assert verifyObject(IMessageFilterFactory, factory)
    f = factory.makeFilter({}, FilterContext(HOST, "/x", resolverFor(dnsServer), reactor))
    assert verifyObject(IMessageFilter, f)
    assert f.name == "spf-dkim-dmarc"


@pytest.mark.parametrize("options, key", [
    ({"max_signatures": 0}, "max_signatures"),
    ({"max_signatures": "5"}, "max_signatures"),
    ({"reject_on_dmarc": "yes"}, "reject_on_dmarc"),
    ({"time_limit": 0}, "time_limit"),
    ({"spf_helo": 1}, "spf_helo"),
    ({"dkim_minimum_bits": 2}, "dkim_minimum_bits"),
])
def test_bad_options_name_the_key_and_the_fix(dnsServer, options, key):
    with pytest.raises(ConfigError) as info:
        makeVerifier(dnsServer, **options)
    text = str(info.value)
    assert f"[filters.spf-dkim-dmarc] {key}" in text and "Fix:" in text


# -- results ------------------------------------------------------------------------


def test_aligned_signed_message_passes_everything(dnsServer):
    verdict = runHook(makeVerifier(dnsServer), session(), signedGood())
    assert verdict.action == ACCEPT
    ar = authResults(verdict)
    assert ar.startswith(f"{HOST};")
    assert "spf=pass smtp.mailfrom=bob@good.example" in ar
    assert "spf=pass smtp.helo=mail.good.example" in ar
    assert "dkim=pass header.d=good.example header.s=rsa header.a=rsa-sha256 header.b=" in ar
    assert "dkim=pass header.d=good.example header.s=ed header.a=ed25519-sha256 header.b=" in ar
    assert "dmarc=pass (p=reject) header.from=good.example" in ar
    # One header, values folded one result a line (RFC 5322 §2.2.3).
    (name, value), = verdict.headers
    assert "\r\n\t" in value and "\n" not in value.replace("\r\n\t", "")


def test_forged_from_under_p_reject_is_refused_at_end_of_data(dnsServer):
    # evil.example's own SPF passes, but nothing aligns with good.example in From.
    forger = session(client="192.0.2.66", sender="x@evil.example", helo="evil.example")
    verdict = runHook(makeVerifier(dnsServer), forger, message())
    assert verdict.action == REJECT
    assert verdict.code == 550
    assert verdict.text.startswith("5.7.1 ") and "DMARC" in verdict.text
    assert "good.example" in verdict.text


def forged(server, fromHeader: str, **options):
    """The verdict on a message from evil.example's host claiming C{fromHeader}."""
    return runHook(makeVerifier(server, **options),
                   session(client="192.0.2.66", sender="x@evil.example"),
                   message(fromHeader=fromHeader))


@pytest.mark.parametrize("fromHeader, options, action, result", [
    # reject_on_dmarc = false: a p=reject failure goes to Junk instead.
    ("a@good.example", {"reject_on_dmarc": False}, QUARANTINE, "dmarc=fail (p=reject)"),
    # p=quarantine: Junk.
    ("q@quarantine.example", {}, QUARANTINE, "dmarc=fail (p=quarantine)"),
    # RFC 7489 §6.6.4: outside pct= (0 here) the next policy down applies.
    ("s@sampled.example", {}, QUARANTINE, "dmarc=fail (p=reject)"),
    # A subdomain without a record of its own gets its organizational domain's sp=.
    ("n@news.relaxed.example", {}, ACCEPT, "dmarc=fail (p=none)"),
])
def test_dmarc_dispositions(dnsServer, fromHeader, options, action, result):
    verdict = forged(dnsServer, fromHeader, **options)
    assert verdict.action == action
    domain = fromHeader.partition("@")[2]
    assert f"{result} header.from={domain}" in authResults(verdict)


def test_organizational_domain_comes_from_the_public_suffix_list(dnsServer):
    assert forged(dnsServer, "m@mail.shop.example.co.uk").action == REJECT
    queried = [name for name, _ in dnsServer.queries]
    assert "_dmarc.example.co.uk" in queried and "_dmarc.co.uk" not in queried


def test_relaxed_spf_alignment_accepts_a_subdomain_bounce_address(dnsServer):
    verdict = runHook(makeVerifier(dnsServer), session(sender="b@bounces.good.example"), message())
    ar = authResults(verdict)
    assert verdict.action == ACCEPT
    assert "spf=pass smtp.mailfrom=b@bounces.good.example" in ar
    assert "dkim=none" in ar and "dmarc=pass" in ar


def test_strict_spf_alignment_refuses_a_subdomain(dnsServer):
    verdict = runHook(makeVerifier(dnsServer), session(sender="b@bounces.strict.example"),
                      message(fromHeader="a@strict.example"))
    assert verdict.action == REJECT


def test_null_sender_is_checked_with_the_helo_identity(dnsServer):
    # RFC 7208 §2.4: for <> the MAIL FROM identity is postmaster@<HELO name>.
    verdict = runHook(makeVerifier(dnsServer), session(sender=""), message())
    ar = authResults(verdict)
    assert "spf=pass smtp.helo=mail.good.example" in ar
    assert "smtp.mailfrom" not in ar
    assert "dmarc=pass" in ar and verdict.action == ACCEPT


def test_helo_check_can_be_turned_off(dnsServer):
    f = makeVerifier(dnsServer, spf_helo=False)
    ar = authResults(runHook(f, session(), signedGood()))
    assert "smtp.helo" not in ar and "spf=pass smtp.mailfrom=bob@good.example" in ar


def test_spf_ptr_and_macros(dnsServer):
    f = makeVerifier(dnsServer, spf_helo=False)
    ar = authResults(runHook(f, session(client="192.0.2.20", sender="p@ptr.example"),
                             message(fromHeader="p@ptr.example")))
    assert "spf=pass smtp.mailfrom=p@ptr.example" in ar
    ar = authResults(runHook(f, session(client="192.0.2.20", sender="carol@macro.example"),
                             message(fromHeader="carol@macro.example")))
    assert "spf=pass smtp.mailfrom=carol@macro.example" in ar
    ar = authResults(runHook(f, session(client="192.0.2.21", sender="carol@macro.example"),
                             message(fromHeader="carol@macro.example")))
    assert "spf=fail smtp.mailfrom=carol@macro.example" in ar


def test_dns_temporary_errors_give_temperror_never_a_reject(dnsServer):
    raw = sign(message(fromHeader="t@tempfail.example"), RSA, "tempfail.example", "rsa")
    verdict = runHook(makeVerifier(dnsServer), session(sender="t@tempfail.example"), raw)
    ar = authResults(verdict)
    assert verdict.action == ACCEPT
    assert "spf=temperror smtp.mailfrom=t@tempfail.example" in ar
    assert "dkim=temperror" in ar and "header.d=tempfail.example" in ar
    assert "dmarc=temperror" in ar


def test_authenticated_sessions_are_skipped(dnsServer):
    before = len(dnsServer.queries)
    verdict = runHook(makeVerifier(dnsServer), session(authenticated="alice@receiver.example"),
                      message())
    assert verdict is None
    assert len(dnsServer.queries) == before


@pytest.mark.parametrize("client, trusted, checkLocal, checked", [
    ("127.0.0.1", (), False, False),  # this host (OpenDMARC IgnoreHosts, Rspamd check_local)
    ("::1", (), False, False),
    ("198.51.100.7", ("198.51.100.0/24",), False, False),  # [relay] trusted_networks
    ("198.51.100.7", (), False, True),
    ("127.0.0.1", (), True, True),  # check_local = true verifies them too
])
def test_local_and_trusted_clients_are_not_verified(dnsServer, client, trusted, checkLocal,
                                                    checked):
    from twistmail import config as configmod
    from twistmail.filters.spfdkimdmarc import SpfDkimDmarcFactory

    config = configmod.load(None, {"relay": {"trusted_networks": list(trusted)}})
    context = FilterContext(HOST, "/nonexistent", resolverFor(dnsServer), reactor, config)
    verifier = SpfDkimDmarcFactory().makeFilter({"check_local": checkLocal}, context)
    before = len(dnsServer.queries)
    verdict = runHook(verifier, session(client=client), message())
    assert (verdict is not None) is checked
    assert (len(dnsServer.queries) > before) is checked


def test_each_message_is_logged_with_who_what_and_result(dnsServer):
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        runHook(makeVerifier(dnsServer), session(client="192.0.2.66", sender="x@evil.example"),
                message())
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e for e in events if e.get("log_format", "").startswith("spf-dkim-dmarc ")]
    assert len(logged) == 1
    event = logged[0]
    assert (event["client"], event["domain"], event["spf"], event["dkim"], event["dmarc"],
            event["action"]) == ("192.0.2.66", "good.example", "pass", "none", "fail", "reject")


def test_from_fields_are_read_from_the_header_section_only():
    raw = (b"Received: from x\r\n\tby y\r\nfROM : \"Doe, J\" <j@a.example>,\r\n\t k@b.example\r\n"
           b"Subject: from: not@this.example\r\n\r\nFrom: body@c.example\r\n")
    values = fromValues(raw)
    assert values == [' "Doe, J" <j@a.example>,\t k@b.example']
    assert fromDomains(values) == (["a.example", "b.example"], "several addresses in From")
    assert fromDomains(fromValues(b"From: a@a.example\nFrom: b@b.example\n\n")) \
        == (["a.example", "b.example"], "2 From header fields")
    assert fromDomains(fromValues(b"To: x@y.example\r\n\r\n")) == ([], "0 From header fields")
    assert fromDomains(fromValues(b"From: =?utf-8?q?J=2C_D?= <j@a.example>\r\n\r\n")) \
        == (["a.example"], "")


def test_organizational_domains_are_kept_in_a_bounded_cache():
    for n in range(dmarc.ORG_DOMAIN_CACHE + 10):
        assert dmarc.organizationalDomain(f"a.b{n}.example.co.uk") == "example.co.uk"
    assert dmarc.organizationalDomain.cache_info().currsize == dmarc.ORG_DOMAIN_CACHE


# -- where the checks run --------------------------------------------------------------


def _inMemory(raw: bytes) -> FilterMessage:
    """As the engine builds it for a message held in memory (the spool did not spill)."""
    return replace(filterMessage(raw), inMemory=True)


class _CountingPool:
    """The resolver's pool, counting the jobs it is given."""

    def __init__(self) -> None:
        self.jobs = 0

    def __call__(self, f, *args):
        self.jobs += 1
        return threads.deferToThread(f, *args)


def _verifierWithPool(server, **options):
    pool = _CountingPool()
    resolver = DnsPythonMXResolver([("127.0.0.1", server.port)], 2, pool)
    context = FilterContext(HOST, "/nonexistent", resolver, reactor)
    return SpfDkimDmarcFactory().makeFilter(options, context), pool


def _called(filter, sessionInfo, msg):
    """(the hook's return value itself, its verdict): called on the reactor thread."""
    returned = onReactor(lambda: defer.succeed([filter.endOfData(sessionInfo, msg)]))[0]
    verdict = onReactor(lambda: returned) if isinstance(returned, defer.Deferred) else returned
    return returned, verdict


@pytest.mark.parametrize("processes", [0, 1])
@pytest.mark.parametrize("raw, sender", [
    (signedGood(), "bob@good.example"),  # everything passes
    (message(fromHeader="Alice <alice@good.example>"), "x@evil.example"),  # p=reject: 550
    (message(fromHeader="q@quarantine.example"), "q@quarantine.example"),  # Junk
    (sign(message(fromHeader="t@tempfail.example"), RSA, "tempfail.example", "rsa"),
     "t@tempfail.example"),  # SERVFAIL is never kept: always asked again in the pool
    # (An NXDOMAIN is kept too, for the SOA's negative TTL (RFC 2308); this test's DNS
    # server sends no SOA, so its NXDOMAINs expire at once and are asked again.)
])
def test_a_small_message_whose_answers_are_kept_is_checked_without_the_pool(
        dnsServer, raw, sender, processes):
    """The first message from a domain is checked in the DNS pool; once its answers
    are kept, the next is checked at once on the reactor thread, its DKIM
    signatures in a child process if there is one, with the same verdict to the letter."""
    filter, pool = _verifierWithPool(dnsServer, dkim_processes=processes)
    client = session(client="192.0.2.66" if "evil" in sender else "192.0.2.10", sender=sender)
    first, firstVerdict = _called(filter, client, _inMemory(raw))
    assert isinstance(first, defer.Deferred) and pool.jobs == 2
    second, secondVerdict = _called(filter, client, _inMemory(raw))
    if "tempfail" in sender:
        assert pool.jobs == 4
    else:
        assert pool.jobs == 2
        assert isinstance(second, defer.Deferred) == bool(processes)
    assert secondVerdict == firstVerdict
    # As the pool decides it, without the inline path (the message on disk).
    _, onDisk = _called(filter, client, filterMessage(raw))
    assert onDisk == firstVerdict


def test_large_or_spooled_messages_are_always_checked_in_the_pool(dnsServer):
    filter, pool = _verifierWithPool(dnsServer)
    _called(filter, session(), _inMemory(signedGood()))  # the answers are now kept
    jobs = pool.jobs
    large = signedGood(message(body=("x" * 70 + "\r\n") * (INLINE_SIZE // 72 + 1)))
    for msg in (filterMessage(signedGood()), _inMemory(large)):
        returned, verdict = _called(filter, session(), msg)
        assert isinstance(returned, defer.Deferred)
        assert "dkim=pass" in authResults(verdict)
        jobs += 2
        assert pool.jobs == jobs


def test_cached_lookups_mark_a_miss_as_a_temporary_failure():
    def resolveCached(name, rdtype):
        if name == "kept.example":
            return ["record"], 2000.0
        if name == "early.example":
            return [], 1000.0
        raise NotCached()

    lookups = CachedLookups(resolveCached, 5)
    assert lookups("kept.example", "TXT") == ["record"] and not lookups.missed
    assert lookups.expires == 2000.0
    assert lookups("early.example", "TXT") == [] and lookups.expires == 1000.0
    with pytest.raises(DNSFailure) as info:
        lookups("other.example", "TXT")
    assert info.value.temporary and lookups.missed


def test_a_failing_dkim_process_leaves_the_message_to_the_pool(dnsServer):
    filter, pool = _verifierWithPool(dnsServer)
    _, expected = _called(filter, session(), _inMemory(signedGood()))  # answers now kept
    filter._processes = DKIMProcesses(reactor, 1, 5, argv=("/nonexistent/python",))
    _, verdict = _called(filter, session(), _inMemory(signedGood()))
    assert pool.jobs == 4 and verdict == expected


def test_an_spf_result_is_kept_until_the_first_answer_it_was_made_of_expires(
        dnsServer, monkeypatch):
    from twistmail.filters import spfcheck

    calls = []
    checkHost = spfcheck.checkHost
    monkeypatch.setattr(spfcheck, "checkHost", lambda *a, **k: calls.append(a[1:4])
                        or checkHost(*a, **k))
    filter, pool = _verifierWithPool(dnsServer, dkim_processes=0)
    for _ in range(3):
        _, verdict = _called(filter, session(), _inMemory(signedGood()))
        assert "spf=pass smtp.mailfrom=bob@good.example" in authResults(verdict)
    # MAIL FROM and HELO: tried from kept answers and then made in the pool (nothing
    # kept yet), made from kept answers, then kept.
    assert len(calls) == 2 + 2 + 2
    [(key, (results, expires))] = filter._spfResults.items()
    assert key == ("192.0.2.10", "bob@good.example", "mail.good.example")
    assert 0 < expires - time.time() <= 60  # the zone's TTL
    filter._spfResults[key] = (results, time.time() - 1)
    _called(filter, session(), _inMemory(signedGood()))
    assert len(calls) == 8
    # Another sender is another result.
    _called(filter, session(sender="x@good.example"), _inMemory(signedGood()))
    assert len(calls) == 10 and len(filter._spfResults) == 2


def test_dmarc_policies_are_kept_by_from_field_until_their_first_answer_expires(
        dnsServer, monkeypatch):
    calls = []
    discover = dmarc.discover
    monkeypatch.setattr(dmarc, "discover", lambda lookups, domain: calls.append(domain)
                        or discover(lookups, domain))
    filter, pool = _verifierWithPool(dnsServer, dkim_processes=0)
    for _ in range(3):
        _, verdict = _called(filter, session(), _inMemory(signedGood()))
        assert "dmarc=pass (p=reject) header.from=good.example" in authResults(verdict)
    assert calls == ["good.example"] * 2  # in the pool, from kept answers, then kept
    [(key, (policies, expires))] = filter._policyResults.items()
    assert key == (" Alice <alice@good.example>",)  # the field value, as written
    assert 0 < expires - time.time() <= 60
    forged = message(fromHeader="q@quarantine.example")
    _called(filter, session(sender="q@quarantine.example"), _inMemory(forged))
    _, verdict = _called(filter, session(sender="q@quarantine.example"), _inMemory(forged))
    assert verdict.action == QUARANTINE and len(filter._policyResults) == 2
    filter._policyResults[key] = (policies, time.time() - 1)
    _called(filter, session(), _inMemory(signedGood()))
    assert calls[-1] == "good.example" and len(calls) == 2 + 2 + 1
