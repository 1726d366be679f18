"""Hostile input to inbound verification: each gets a result, never a traceback or a hang.

Malformed DKIM signatures, weak keys, body-length limits, From-header tricks,
thousands of signatures, SPF records built to cost lookups, DMARC records full
of garbage and a DNS server that never answers (issue 11, "Hostile input").
DNS is a twisted.names server on loopback; the resolver is the relay's.
"""

from __future__ import annotations

import time

import pytest
from dnsserver import TXT, A, startDNS
from mailauth import (
    HOST,
    WEAK_RSA_PEM,
    RSAKey,
    authResults,
    filterMessage,
    makeVerifier,
    message,
    runHook,
    session,
    sign,
)
from support import onReactor
from twisted.internet import defer, reactor

from twistmail.model import ACCEPT, REJECT

RSA = RSAKey()
WEAK = RSAKey(WEAK_RSA_PEM)

SLOW = ("slow.example", "rsa._domainkey.slow.example", "rsa2._domainkey.slow.example",
        "_dmarc.sub.slow.example")


def chunks(text: str, size: int = 255) -> list[str]:
    """A long TXT record as the strings of at most 255 octets DNS carries (RFC 7208 §3.3)."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def zone() -> dict:
    z = {
        "good.example": [TXT("v=spf1 ip4:192.0.2.10 -all")],
        "rsa._domainkey.good.example": [RSA.record()],
        "weak._domainkey.good.example": [WEAK.record()],
        "_dmarc.good.example": [TXT("v=DMARC1; p=reject")],
        "victim.example": [],
        "_dmarc.victim.example": [TXT("v=DMARC1; p=reject")],
        "evil.example": [TXT("v=spf1 ip4:192.0.2.66 -all")],
        "rsa._domainkey.evil.example": [RSA.record()],
        # SPF built to cost lookups: an include loop, 100 mechanisms, void lookups.
        "loop1.example": [TXT("v=spf1 include:loop2.example -all")],
        "loop2.example": [TXT("v=spf1 include:loop1.example -all")],
        "many.example": [TXT(*chunks("v=spf1 " + " ".join(f"a:h{n}.many.example"
                                                         for n in range(100)) + " -all"))],
        "void.example": [TXT("v=spf1 a:n1.void.example a:n2.void.example a:n3.void.example "
                             "ip4:192.0.2.10 -all")],
        # DMARC records with garbage, which RFC 7489 §6.3 says to tolerate.
        "garbage.example": [],
        "_dmarc.garbage.example": [TXT("v=DMARC1;; p=reject; foo=bar; adkim=zz; pct=lots; "
                                       "=x; rua=not a uri; \x7f=1; ;")],
        "badpolicy.example": [],
        "_dmarc.badpolicy.example": [TXT("v=DMARC1; p=bogus")],
        "twice.example": [],
        "_dmarc.twice.example": [TXT("v=DMARC1; p=reject"), TXT("v=DMARC1; p=none")],
        "fast.example": [TXT("v=spf1 ip4:192.0.2.10 -all")],
        "_dmarc.fast.example": [TXT("v=DMARC1; p=none")],
    }
    for n in range(100):
        z[f"h{n}.many.example"] = [A("192.0.2.200")]
    return z


@pytest.fixture(scope="module")
def dnsServer():
    server = startDNS(zone(), hang=SLOW)
    yield server
    server.stop()


def verify(server, raw, options=None, **sessionArgs):
    return runHook(makeVerifier(server, spf_helo=False, **(options or {})), session(**sessionArgs),
                   raw)


#: A rejected message gets no header; with reject_on_dmarc off it is kept, with it.
KEEP = {"reject_on_dmarc": False}


def queriesDuring(server, f):
    before = len(server.queries)
    result = f()
    return result, server.queries[before:]


# -- DKIM ---------------------------------------------------------------------------


def test_bad_base64_in_b_is_a_permerror(dnsServer):
    raw = sign(message(), RSA, "good.example", "rsa")
    raw = raw.replace(b" b=", b" b=!!not*base64!!", 1)
    ar = authResults(verify(dnsServer, raw))
    assert "dkim=permerror" in ar and "header.d=good.example" in ar


def test_bad_base64_in_the_key_record_is_a_permerror(dnsServer):
    z = startDNS({"good.example": [TXT("v=spf1 ip4:192.0.2.10 -all")],
                  "rsa._domainkey.good.example": [TXT("v=DKIM1; k=rsa; p=%%%not-base64")]})
    try:
        ar = authResults(verify(z, sign(message(), RSA, "good.example", "rsa")))
    finally:
        z.stop()
    assert "dkim=permerror" in ar


def test_a_key_under_1024_bits_fails(dnsServer):
    # RFC 8301 §3.2: verifiers MUST NOT consider signatures with smaller RSA keys valid.
    raw = sign(message(), WEAK, "good.example", "weak")
    verdict = verify(dnsServer, raw, KEEP, client="192.0.2.66", sender="x@evil.example")
    ar = authResults(verdict)
    assert "dkim=fail" in ar and "header.s=weak" in ar and "dmarc=fail" in ar
    assert verify(dnsServer, raw, client="192.0.2.66", sender="x@evil.example").action == REJECT


def test_a_body_length_limit_that_leaves_content_unsigned_is_policy(dnsServer):
    signed = sign(message(), RSA, "good.example", "rsa", length=True)
    verdict = verify(dnsServer, signed, client="192.0.2.66", sender="x@evil.example")
    assert "dkim=pass" in authResults(verdict)  # l= covering the whole body verifies as usual
    # RFC 6376 §8.2: appended content after l= is not signed: the attacker's part.
    appended = signed + b"Click https://evil.example/ to confirm your password.\r\n"
    verdict = verify(dnsServer, appended, KEEP, client="192.0.2.66", sender="x@evil.example")
    ar = authResults(verdict)
    assert "dkim=policy" in ar and "dmarc=fail" in ar
    assert verify(dnsServer, appended, client="192.0.2.66",
                  sender="x@evil.example").action == REJECT


def test_two_from_headers_are_a_dmarc_permerror_and_refused_under_p_reject(dnsServer):
    # The DKIM replay / From-spoofing trick: a message validly signed by evil.example,
    # with a second From naming the victim that a mail client may show instead.
    signed = sign(message(fromHeader="x@evil.example"), RSA, "evil.example", "rsa")
    forged = b"From: ceo@victim.example\r\n" + signed
    verdict = verify(dnsServer, forged, client="192.0.2.66", sender="x@evil.example")
    assert verdict.action == REJECT
    assert "victim.example" in verdict.text


def test_one_from_with_two_addresses_is_a_permerror(dnsServer):
    raw = message(fromHeader="x@evil.example, ceo@victim.example")
    verdict = verify(dnsServer, raw, client="192.0.2.66", sender="x@evil.example")
    assert verdict.action == REJECT


def test_no_from_header_is_a_permerror(dnsServer):
    raw = b"To: bob@receiver.example\r\nSubject: no from\r\n\r\nHi\r\n"
    verdict = verify(dnsServer, raw, client="192.0.2.66", sender="x@evil.example")
    assert verdict.action == ACCEPT
    assert "dmarc=permerror" in authResults(verdict)


def test_five_thousand_signatures_cost_at_most_max_signatures_lookups(dnsServer):
    one = sign(message(), RSA, "good.example", "rsa")
    header, _, rest = one.partition(b"From:")
    flood = b"".join(header.replace(b"s=rsa", f"s=k{n}".encode()) for n in range(5000))
    raw = flood + b"From:" + rest
    start = time.monotonic()
    verdict, queries = queriesDuring(dnsServer, lambda: verify(dnsServer, raw))
    assert time.monotonic() - start < 10
    keyLookups = [name for name, _ in queries if "._domainkey." in name]
    assert 0 < len(keyLookups) <= 5
    ar = authResults(verdict)
    assert ar.count("dkim=") == 5
    assert len(ar) < 2000


def test_garbage_header_section_gets_results_not_a_traceback(dnsServer):
    raw = b" leading continuation\r\nDKIM-Signature: \xff\xfe;;;=\r\nFrom: \x00@@\r\n\r\nbody\r\n"
    verdict = verify(dnsServer, raw)
    ar = authResults(verdict)
    assert verdict.action == ACCEPT
    assert "dkim=permerror" in ar and "dmarc=permerror" in ar


def test_hostile_values_cannot_forge_a_result_in_the_header():
    from twistmail.filters.authresults import Result, header

    name, value = header(HOST, [Result("dkim", "permerror", (("header.d", "x; dmarc=pass"),),
                                       reason='bad "sig"\r\n; dmarc=pass')])
    assert value.count(";") == 1 + 2  # the authserv-id's, and two inside quoted-strings
    assert 'header.d="x; dmarc=pass"' in value
    assert 'reason="bad \\"sig\\"??; dmarc=pass"' in value


# -- SPF ------------------------------------------------------------------------------


def test_spf_include_loop_is_a_permerror(dnsServer):
    ar = authResults(verify(dnsServer, message(fromHeader="x@loop1.example"), sender="x@loop1.example"))
    assert "spf=permerror smtp.mailfrom=x@loop1.example" in ar


def test_spf_with_100_mechanisms_is_a_permerror_after_ten_lookups(dnsServer):
    # RFC 7208 §4.6.4: at most 10 mechanisms that cause DNS lookups.
    raw = message(fromHeader="x@many.example")
    verdict, queries = queriesDuring(dnsServer, lambda: verify(dnsServer, raw,
                                                               sender="x@many.example"))
    assert "spf=permerror smtp.mailfrom=x@many.example" in authResults(verdict)
    assert len([q for q in queries if q[0].endswith(".many.example")]) <= 11


def test_spf_third_void_lookup_is_a_permerror(dnsServer):
    # RFC 7208 §4.6.4: more than two lookups answering nothing -> permerror, even
    # though a later mechanism (ip4:192.0.2.10) would have matched.
    ar = authResults(verify(dnsServer, message(fromHeader="x@void.example"), sender="x@void.example"))
    assert "spf=permerror smtp.mailfrom=x@void.example" in ar


# -- DMARC ----------------------------------------------------------------------------


def test_dmarc_garbage_tags_are_ignored_and_the_policy_applies(dnsServer):
    verdict = verify(dnsServer, message(fromHeader="g@garbage.example"), client="192.0.2.66",
                     sender="x@evil.example")
    assert verdict.action == REJECT


def test_dmarc_record_without_a_valid_policy_is_not_applied(dnsServer):
    # RFC 7489 §6.6.3: an invalid p= and no rua -> no DMARC processing.
    verdict = verify(dnsServer, message(fromHeader="b@badpolicy.example"), client="192.0.2.66",
                     sender="x@evil.example")
    assert verdict.action == ACCEPT
    assert "dmarc=none" in authResults(verdict)


def test_two_dmarc_records_are_a_permerror_not_applied(dnsServer):
    verdict = verify(dnsServer, message(fromHeader="t@twice.example"), client="192.0.2.66",
                     sender="x@evil.example")
    assert verdict.action == ACCEPT
    assert "dmarc=permerror" in authResults(verdict)


# -- DNS that never answers -----------------------------------------------------------


def test_dns_that_never_answers_gives_temperror_in_time_and_stalls_nobody(dnsServer):
    # Unchecked, this message would wait for 5 lookups of 1 s each: SPF for MAIL FROM
    # and HELO (2 s), then two DKIM keys and _dmarc.sub.slow.example (3 s).  The time
    # limit (1 s) stops each job after its first timeout.  Meanwhile the reactor and
    # another session's checks go on.
    slow = makeVerifier(dnsServer, timeout=1, time_limit=1)
    fast = makeVerifier(dnsServer, timeout=1, time_limit=1, spf_helo=False)
    raw = sign(sign(message(fromHeader="s@sub.slow.example"), RSA, "slow.example", "rsa"),
               RSA, "slow.example", "rsa2")
    slowSession = session(sender="s@slow.example", helo="slow.example")
    fastRaw = message(fromHeader="f@fast.example")
    fastSession = session(sender="f@fast.example")

    def both():
        start = reactor.seconds()
        times = {}

        def record(verdict, which):
            times[which] = reactor.seconds() - start
            return verdict

        slowD = defer.maybeDeferred(slow.endOfData, slowSession, filterMessage(raw))
        slowD.addCallback(record, "slow")
        fastD = defer.maybeDeferred(fast.endOfData, fastSession, filterMessage(fastRaw))
        fastD.addCallback(record, "fast")
        return defer.gatherResults([slowD, fastD]).addCallback(lambda r: (r, times))

    (slowVerdict, fastVerdict), times = onReactor(both)
    assert times["fast"] < 0.9, times  # not queued behind the hanging lookups
    assert times["slow"] < 2.5, times  # one lookup's timeout per job, not five in a row
    ar = authResults(slowVerdict)
    assert slowVerdict.action == ACCEPT
    assert "spf=temperror smtp.mailfrom=s@slow.example" in ar
    assert "spf=temperror smtp.helo=slow.example" in ar
    assert "dkim=temperror" in ar and "dmarc=temperror" in ar
    assert "spf=pass" in authResults(fastVerdict)
