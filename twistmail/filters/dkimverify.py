# -*- test-case-name: tests.test_hostile_verify -*-
"""DKIM verification (RFC 6376; Ed25519 by RFC 8463) of a message's signatures, with dkimpy.

dkimpy does the cryptography and canonicalization; this module decides what
each outcome is called in Authentication-Results (RFC 8601 §2.7.1) and what
it costs:

* at most C{maxSignatures} signatures are verified, the topmost first (a
  message with thousands of DKIM-Signature fields costs no more lookups);
* key records come through our resolver (dkimpy's ``dnsfunc``); a temporary
  DNS failure is ``temperror``, a missing or unparseable key ``permerror``,
  an RSA key under C{minimumBits} ``fail`` (RFC 8301 §3.2: never valid);
* a malformed signature (bad base64, missing tags) is ``permerror``;
* a signature whose ``l=`` leaves part of the body unsigned is ``policy``:
  whatever follows the signed length is anyone's (RFC 6376 §8.2), so it does
  not count for DMARC.  One whose ``l=`` covers the whole body verifies as usual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import parse_tag_value

from twistmail.filters.lookups import Lookups
from twistmail.relay.mx import DNSFailure

#: RFC 6008 §4: header.b carries enough of b= to tell signatures apart.
B_PREFIX = 8


@dataclass(frozen=True)
class DKIMResult:
    result: str  # pass, fail, policy, permerror, temperror
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    b: str = ""  # the start of b=
    reason: str = ""


class _KeyLookup:
    """dkimpy's ``dnsfunc``: the key record of one signature, noting what was wrong with it."""

    def __init__(self, lookups: Lookups, minimumBits: int) -> None:
        self._lookups = lookups
        self._minimumBits = minimumBits
        self.problem: tuple[str, str] | None = None

    def __call__(self, name: bytes, timeout=None):
        try:
            host = name.decode("ascii").rstrip(".")
        except UnicodeDecodeError:
            self.problem = ("permerror", "signing domain is not an ASCII domain name")
            return None
        records = self._lookups.records(host, "TXT")  # a temporary DNSFailure propagates
        if not records:
            self.problem = ("permerror", f"no key for signature at {host}")  # RFC 6376 §6.1.2
            return None
        text = b"".join(records[0].strings)
        try:
            _, bits, algorithm, _ = dkim.evaluate_pk(name, text)
        except Exception as e:  # KeyFormatError, binascii.Error, whatever a bad p= raises
            self.problem = ("permerror", f"unusable key record: {e}")
            return None
        if algorithm == b"rsa" and bits < self._minimumBits:
            self.problem = ("fail", f"key too small: {bits} bits")
            return None
        return text


def _text(tags: dict, tag: bytes) -> str:
    return tags.get(tag, b"").decode("ascii", "replace")


def _verifyOne(message: dkim.DKIM, index: int, value: bytes, lookups: Lookups,
               minimumBits: int) -> DKIMResult:
    try:
        tags = parse_tag_value(value)
    except Exception:
        tags = {}
    facts = {"domain": _text(tags, b"d"), "selector": _text(tags, b"s"),
             "algorithm": _text(tags, b"a"),
             "b": re.sub(rb"\s+", b"", tags.get(b"b", b""))[:B_PREFIX].decode("ascii", "replace")}
    keys = _KeyLookup(lookups, minimumBits)
    try:
        verified = message.verify(index, dnsfunc=keys)
    except DNSFailure as e:
        return DKIMResult("temperror", reason=e.text, **facts)
    except dkim.DKIMException as e:  # ValidationError, MessageFormatError, ...
        return DKIMResult("permerror", reason=str(e), **facts)
    except Exception:  # dkimpy on input nobody anticipated: still an answer
        return DKIMResult("permerror", reason="signature cannot be processed", **facts)
    if not verified:
        result, reason = keys.problem or ("fail", "signature did not verify")
        return DKIMResult(result, reason=reason, **facts)
    if b"l" in tags:
        canon = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        if int(tags[b"l"]) < len(canon.canonicalize_body(message.body)):
            return DKIMResult("policy", reason="body length limit (l=) leaves content unsigned",
                              **facts)
    return DKIMResult("pass", **facts)


def verifyAll(raw: bytes, lookups: Lookups, maxSignatures: int,
              minimumBits: int = 1024) -> list[DKIMResult]:
    """A result for each of the first C{maxSignatures} signatures of C{raw}, top first.

    Blocking (DNS, hashing): run it in the DNS pool.  [] for an unsigned message.
    """
    try:
        message = dkim.DKIM(raw, minkey=minimumBits)
    except Exception:  # dkimpy's header parser: MessageFormatError, IndexError, ...
        head = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].lower()
        if b"dkim-signature:" in head:
            return [DKIMResult("permerror", reason="malformed header section")]
        return []
    signatures = [value for name, value in message.headers if name.lower() == b"dkim-signature"]
    return [_verifyOne(message, index, value, lookups, minimumBits)
            for index, value in enumerate(signatures[:maxSignatures])]
