"""DKIM verification made cheap without changing a result (issue 11's benchmark).

The body is canonicalised and hashed once per (canonicalisation, hash, l=) and
shared between signatures, RSA is verified by OpenSSL (cryptography), and
parsed public keys are cached by their record text.  Every result is compared
with dkimpy's own verdict.  No sockets: key records come from a dict.
"""

from __future__ import annotations

import base64
import random
import types

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dkim.canonicalization import Relaxed, Simple
from mailauth import Ed25519Key, RSAKey, message

from twistmail.filters import dkimverify
from twistmail.relay.mx import DNSFailure

RSA = RSAKey()
ED = Ed25519Key()
BODY = "Hello.\r\n\r\nA second paragraph,   with  spaces \t\r\n\r\n\r\n"


def record(text: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(strings=(text.encode(),))


KEYS = {"rsa._domainkey.good.example": record(f"v=DKIM1; k=rsa; p={RSA.p}"),
        "ed._domainkey.good.example": record(f"v=DKIM1; k=ed25519; p={ED.p}")}


class FakeLookups:
    """L{twistmail.filters.lookups.Lookups} over a dict: TXT answers, [] for the rest."""

    def __init__(self, zone: dict) -> None:
        self.zone = zone

    def records(self, name: str, rdtype: str) -> list:
        answer = self.zone.get(name, [])
        if isinstance(answer, Exception):
            raise answer
        return [answer] if rdtype == "TXT" and answer else []

    __call__ = records


def signWith(raw: bytes, key, selector: str, canon=(b"relaxed", b"relaxed"),
             length: bool = False) -> bytes:
    header = dkim.sign(raw, selector.encode(), b"good.example", key.private,
                       signature_algorithm=key.algorithm, canonicalize=canon,
                       include_headers=[b"from", b"to", b"subject", b"date"], length=length)
    return header + raw


def dkimpyVerdicts(raw: bytes, zone: dict) -> list[bool]:
    """What dkimpy alone says of each signature of C{raw}: the reference."""
    def dnsfunc(name, timeout=None):
        answer = zone.get(name.decode().rstrip("."))
        return b"".join(answer.strings) if answer else None

    count = sum(1 for line in raw.split(b"\r\n\r\n")[0].split(b"\r\n")
                if line.lower().startswith(b"dkim-signature:"))
    verdicts = []
    for index in range(count):
        try:
            verdicts.append(dkim.DKIM(raw).verify(index, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts


def tamperBody(raw: bytes) -> bytes:
    return raw.replace(b"second paragraph", b"second Paragraph")


CASES = {
    "rsa relaxed": lambda raw: signWith(raw, RSA, "rsa"),
    "rsa simple": lambda raw: signWith(raw, RSA, "rsa", (b"simple", b"simple")),
    "ed25519 relaxed": lambda raw: signWith(raw, ED, "ed"),
    "rsa and ed25519, different canonicalisation":
        lambda raw: signWith(signWith(raw, RSA, "rsa", (b"simple", b"simple")), ED, "ed"),
    "rsa relaxed/simple and simple/relaxed":
        lambda raw: signWith(signWith(raw, RSA, "rsa", (b"relaxed", b"simple")), RSA, "rsa",
                             (b"simple", b"relaxed")),
    "l= whole body": lambda raw: signWith(raw, RSA, "rsa", length=True),
    "l= with an unsigned tail": lambda raw: signWith(raw, RSA, "rsa", length=True)
        + b"Appended by someone else.\r\n",
    "l= and no l= together": lambda raw: signWith(signWith(raw, RSA, "rsa", length=True), ED, "ed")
        + b"tail\r\n",
    "body changed after signing": lambda raw: tamperBody(
        signWith(signWith(raw, RSA, "rsa"), ED, "ed")),
    "header changed after signing": lambda raw: signWith(raw, RSA, "rsa").replace(
        b"Subject: test", b"Subject: tost"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_results_are_dkimpys(case):
    raw = CASES[case](message(body=BODY))
    results = dkimverify.verifyAll(raw, FakeLookups(KEYS), 5)
    reference = dkimpyVerdicts(raw, KEYS)
    assert len(results) == len(reference)
    for result, verified in zip(results, reference, strict=True):
        if result.result == "policy":  # verified, but l= leaves a tail unsigned
            assert verified
            assert case.startswith("l=")
        else:
            assert (result.result == "pass") == verified, (result, verified)
    if case == "l= with an unsigned tail":
        assert [r.result for r in results] == ["policy"]
    if case == "rsa and ed25519, different canonicalisation":
        assert [r.result for r in results] == ["pass", "pass"]


def test_the_body_is_canonicalised_once_for_signatures_that_share_it(monkeypatch):
    counts = {"relaxed": 0, "simple": 0}

    def counting(name, original):
        def canonicalize_body(body):
            counts[name] += 1
            return original(body)
        return staticmethod(canonicalize_body)

    monkeypatch.setattr(Relaxed, "canonicalize_body",
                        counting("relaxed", Relaxed.canonicalize_body))
    monkeypatch.setattr(Simple, "canonicalize_body", counting("simple", Simple.canonicalize_body))
    monkeypatch.setattr(dkimverify, "relaxedBody", counting("relaxed", dkimverify.relaxedBody)
                        .__func__, raising=False)  # the fast one counts as a relaxed one
    raw = signWith(signWith(signWith(message(body=BODY), RSA, "rsa"), ED, "ed"), RSA, "rsa",
                   length=True)
    counts.update(relaxed=0, simple=0)  # signing canonicalised too
    results = dkimverify.verifyAll(raw, FakeLookups(KEYS), 5)
    assert [r.result for r in results] == ["pass", "pass", "pass"]
    assert counts == {"relaxed": 1, "simple": 0}


def test_the_fast_relaxed_body_is_dkimpys():
    rng = random.Random(11)
    pieces = [b"a", b"bc", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n\r\n", b"\r", b"\n"]
    bodies = [b"", b"\r\n", b"\r\n\r\n", b" ", b"\t\r\n", b"a \t", b"a\t\r\n \r\n"]
    bodies += [b"".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
               for _ in range(3000)]
    for body in bodies:
        assert dkimverify.relaxedBody(body) == Relaxed.canonicalize_body(body), body


def test_the_fast_relaxed_header_fields_are_dkimpys():
    rng = random.Random(12)
    pieces = [b"a", b"B", b" ", b"  ", b"\t", b" \t ", b"\r\n ", b"\n\t", b"\r", b"\x0b", b"\x0c"]
    names = [b"From", b"SUBJECT ", b"x-a\t", b"To"]
    values = [b"", b" ", b"\r\n", b" a  b\t\r\n"]
    values += [b"".join(rng.choice(pieces) for _ in range(rng.randrange(30))) for _ in range(3000)]
    headers = [(rng.choice(names), value) for value in values]
    assert dkimverify.relaxedHeaders(headers) == Relaxed.canonicalize_headers(headers)


def test_rsa_is_verified_by_openssl_not_by_dkimpys_python_rsa(monkeypatch):
    def slow(*args):
        raise AssertionError("dkimpy's pure-Python RSA was used")

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_verify", slow)
    raw = signWith(message(body=BODY), RSA, "rsa")
    assert [r.result for r in dkimverify.verifyAll(raw, FakeLookups(KEYS), 5)] == ["pass"]
    forged = raw.replace(b"Subject: test", b"Subject: tost")  # the body hash still matches
    assert [r.result for r in dkimverify.verifyAll(forged, FakeLookups(KEYS), 5)] == ["fail"]


def test_a_key_record_is_parsed_once_and_the_cache_is_bounded(monkeypatch):
    calls = []
    original = dkim.evaluate_pk
    monkeypatch.setattr(dkim, "evaluate_pk", lambda *a: calls.append(a) or original(*a))
    rsaKey, edKey = RSAKey(), Ed25519Key()  # records no other test has put in the cache
    zone = {"rsa._domainkey.good.example": record(f"v=DKIM1; k=rsa; p={rsaKey.p}"),
            "ed._domainkey.good.example": record(f"v=DKIM1; k=ed25519; p={edKey.p}")}
    raw = signWith(signWith(message(body=BODY), rsaKey, "rsa"), edKey, "ed")
    for _ in range(3):
        assert [r.result for r in dkimverify.verifyAll(raw, FakeLookups(zone), 5)] \
            == ["pass", "pass"]
    assert len(calls) == 2  # one per distinct record, not per signature and message
    assert 0 < dkimverify.publicKey.cache_info().maxsize <= 1024


def rsaRecord(modulus: int, exponent: int) -> types.SimpleNamespace:
    """A k=rsa record holding the PKCS#1 RSAPublicKey (n, e), as dkimpy reads it."""
    def der(tag: int, content: bytes) -> bytes:
        size = len(content)
        length = bytes([size]) if size < 128 else \
            bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes((size.bit_length() + 7)
                                                                            // 8, "big")
        return bytes([tag]) + length + content

    def integer(n: int) -> bytes:
        return der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))

    p = base64.b64encode(der(0x30, integer(modulus) + integer(exponent))).decode()
    return record(f"v=DKIM1; k=rsa; p={p}")


HOSTILE = {
    "even exponent": lambda: rsaRecord((1 << 2047) | 12345, 65536),
    "exponent 1": lambda: rsaRecord((1 << 2047) | 12345, 1),
    "an EC key under k=rsa": lambda: record("v=DKIM1; k=rsa; p=" + base64.b64encode(
        ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo)).decode()),
    "bad base64": lambda: record("v=DKIM1; k=rsa; p=@@@notbase64"),
    "ed25519 key of 5 octets": lambda: record("v=DKIM1; k=ed25519; p=AAAAAAA="),
    "unknown k=": lambda: record(f"v=DKIM1; k=dsa; p={RSA.p}"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_key_gets_dkimpys_answer_never_a_traceback(case):
    zone = {"rsa._domainkey.good.example": HOSTILE[case]()}
    raw = signWith(message(body=BODY), RSA, "rsa")
    results = dkimverify.verifyAll(raw, FakeLookups(zone), 5)
    assert len(results) == 1
    assert results[0].result in ("fail", "permerror")
    assert dkimpyVerdicts(raw, zone) == [False]


def test_a_temporary_dns_failure_is_temperror():
    zone = {"rsa._domainkey.good.example": DNSFailure(True, "4.4.3", "timed out")}
    raw = signWith(message(body=BODY), RSA, "rsa")
    assert [r.result for r in dkimverify.verifyAll(raw, FakeLookups(zone), 5)] == ["temperror"]
