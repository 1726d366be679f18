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

import base64
import functools
import itertools
import re
from dataclasses import dataclass

import dkim
import nacl.exceptions
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    correct_empty_body,
    strip_trailing_lines,
)
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


#: Parsed key records kept (L{publicKey}): a message's few selectors, and the busy senders'.
KEY_CACHE = 256

#: a= hash names (RFC 6376 §3.3, dkimpy's HASH_ALGORITHMS) as cryptography's hashes.
_OPENSSL_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


@dataclass(frozen=True)
class PublicKey:
    """A key record as dkimpy's C{evaluate_pk} reads it, plus the RSA key as OpenSSL's."""

    pk: object  # dkimpy's: {"modulus", "publicExponent"} for RSA, nacl's VerifyKey for Ed25519
    bits: int
    algorithm: bytes  # k=: b"rsa" or b"ed25519"
    tlsrpt: bool
    openssl: rsa.RSAPublicKey | None  # None: not RSA, or a key OpenSSL refuses (dkimpy checks it)


@functools.lru_cache(maxsize=KEY_CACHE)
def publicKey(text: bytes) -> PublicKey:
    """The parsed key record C{text} (not empty); dkimpy's exceptions for an unusable one.

    Cached by the record's text, so a changed record is parsed afresh.
    """
    pk, bits, algorithm, tlsrpt = dkim.evaluate_pk(b"", text)
    openssl = None
    if algorithm == b"rsa":
        try:
            openssl = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
        except (ValueError, UnsupportedAlgorithm):  # e.g. an even or tiny exponent
            pass
    return PublicKey(pk, bits, algorithm, tlsrpt, openssl)


def _rsaVerified(key: PublicKey, digest, signature: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 (RFC 8017 §8.2.2) of C{digest} (a hashlib object): as dkimpy decides."""
    hashType = _OPENSSL_HASHES.get(digest.name.lower())
    if key.openssl is None or hashType is None:
        return dkim.RSASSA_PKCS1_v1_5_verify(digest, signature, key.pk)
    size = (key.openssl.key_size + 7) // 8
    if len(signature) < size:  # dkimpy reads the signature as an integer: leading zeros optional
        signature = signature.rjust(size, b"\0")
    try:
        key.openssl.verify(signature, digest.digest(), padding.PKCS1v15(),
                           asym_utils.Prehashed(hashType()))
    except InvalidSignature:
        return False
    return True


#: Only the whitespace runs that change: dkimpy's [\t ]+ also rewrites every lone space.
_WSP_TO_COMPRESS = re.compile(rb"[\t ]{2,}|\t")


def _compressed(line: bytes) -> bytes:
    return _WSP_TO_COMPRESS.sub(b" ", line) if b"\t" in line or b"  " in line else line


def relaxedBody(body: bytes) -> bytes:
    """RFC 6376 §3.4.4, exactly as dkimpy's C{Relaxed.canonicalize_body}, several times faster.

    dkimpy runs two regexes over the whole body; line by line, most lines need
    only C{rstrip}.  Whitespace before CRLF goes, other runs become one space.
    """
    lines = body.split(b"\r\n")
    last = lines.pop()  # not followed by CRLF: its trailing whitespace is compressed, not removed
    lines = [_compressed(line.rstrip(b" \t")) for line in lines]
    lines.append(_compressed(last))
    return correct_empty_body(strip_trailing_lines(b"\r\n".join(lines)))


_FOLD = re.compile(rb"\r?\n")


def relaxedHeaders(headers: list) -> list:
    """RFC 6376 §3.4.2, exactly as dkimpy's C{Relaxed.canonicalize_headers}, without
    its two whole-value regex substitutions for every field: most fields are not
    folded and have no run of whitespace to compress."""
    return [(name.lower().rstrip(),
             _compressed(_FOLD.sub(b"", value) if b"\n" in value else value).strip() + b"\r\n")
            for name, value in headers]


class _Verifier(dkim.DKIM):
    """dkimpy's DKIM with the costly parts done once per message and RSA done by OpenSSL.

    Overrides C{verify_sig} and C{verify_sig_process} (dkimpy 1.1), which
    otherwise re-canonicalise the body and re-parse the key for every signature.
    """

    def __init__(self, raw: bytes, minkey: int) -> None:
        super().__init__(raw, minkey=minkey)
        self._bodies: dict[bytes, bytes] = {}  # canonicalisation name -> canonical body
        self._headers: dict[bytes, list] = {}  # canonicalisation name -> canonical header fields
        self._bodyHashes: dict[tuple, bytes] = {}  # one per verified signature at most

    def canonicalBody(self, policy: CanonicalizationPolicy) -> bytes:
        name = policy.body_algorithm.name
        if name not in self._bodies:
            self._bodies[name] = relaxedBody(self.body) if policy.body_algorithm is Relaxed \
                else policy.canonicalize_body(self.body)
        return self._bodies[name]

    def canonicalHeaders(self, policy: CanonicalizationPolicy) -> list:
        name = policy.header_algorithm.name
        if name not in self._headers:
            self._headers[name] = relaxedHeaders(self.headers) \
                if policy.header_algorithm is Relaxed else policy.canonicalize_headers(self.headers)
        return self._headers[name]

    def _bodyHash(self, policy: CanonicalizationPolicy, algorithm: bytes,
                  length: int | None) -> bytes:
        key = (policy.body_algorithm.name, algorithm, length)
        if key not in self._bodyHashes:
            body = self.canonicalBody(policy)
            hasher = dkim.HASH_ALGORITHMS[algorithm]
            self._bodyHashes[key] = hasher(body if length is None else body[:length]).digest()
        return self._bodyHashes[key]

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        text = dnsfunc(name, timeout=self.timeout)
        try:
            key = publicKey(text) if text else dkim.evaluate_pk(name, text)  # empty: raises
        except (dkim.KeyFormatError, ValueError):  # binascii.Error is a ValueError
            return False
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = key.pk, key.bits, key.algorithm, \
            key.tlsrpt
        return self._verifyWith(key, sig, include_headers, sig_header)

    def _verifyWith(self, key: PublicKey, sig, include_headers, sig_header) -> bool:
        """dkimpy 1.1's C{verify_sig_process}, with the shared body hash and OpenSSL's RSA."""
        if not self.tlsrpt and self.seqtlsrpt:  # RFC 8460: a tlsrpt-only key
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as e:
            raise dkim.MessageFormatError(f"invalid c= value: {e.args[0]}") from None
        hasher = dkim.HASH_ALGORITHMS[sig[b"a"]]
        if b"bh" in sig:  # RFC 6376 §6.1.3 step 1-2: the body hash first
            length = int(sig[b"l"]) if b"l" in sig else None
            try:
                bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except TypeError as e:
                raise dkim.MessageFormatError(str(e)) from None
            bodyhash = self._bodyHash(policy, sig[b"a"], length)
            if bodyhash != bh:  # dkimpy's words, which the header's reason= carries
                raise dkim.ValidationError(f"body hash mismatch (got {base64.b64encode(bodyhash)}"
                                           f", expected {sig[b'bh']})")
        if b"from" in include_headers:  # dkimpy: an added From breaks the signature
            include_headers.append(b"from")
        h = hasher()
        headers = self.canonicalHeaders(policy)
        self.signed_headers = dkim.hash_headers(h, policy, headers, include_headers, sig_header,
                                                sig)
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        if key.algorithm == b"rsa":
            try:
                verified = _rsaVerified(key, h, signature)
            except (TypeError, dkim.crypto.DigestTooLargeError) as e:
                raise dkim.KeyFormatError(f"digest too large for modulus: {e}") from None
            if verified and key.bits < self.minkey:
                raise dkim.KeyFormatError(f"public key too small: {key.bits}")
            return verified
        if key.algorithm == b"ed25519":  # RFC 8463 §3: the signature is over the hash
            try:
                key.pk.verify(h.digest(), signature)
            except nacl.exceptions.BadSignatureError:
                return False
            return True
        raise dkim.UnknownKeyTypeError(key.algorithm)


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
            key = publicKey(text) if text else dkim.evaluate_pk(name, text)  # empty: raises
        except Exception as e:  # KeyFormatError, binascii.Error, whatever a bad p= raises
            self.problem = ("permerror", f"unusable key record: {e}")
            return None
        if key.algorithm == b"rsa" and key.bits < self._minimumBits:
            self.problem = ("fail", f"key too small: {key.bits} bits")
            return None
        return text


def _text(tags: dict, tag: bytes) -> str:
    return tags.get(tag, b"").decode("ascii", "replace")


def _verifyOne(message: _Verifier, index: int, value: bytes, lookups: Lookups,
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
        if int(tags[b"l"]) < len(message.canonicalBody(canon)):
            return DKIMResult("policy", reason="body length limit (l=) leaves content unsigned",
                              **facts)
    return DKIMResult("pass", **facts)


#: A DKIM-Signature field with its folded lines (RFC 5322 §2.2.3).
_SIGNATURE_FIELD = re.compile(rb"^dkim-signature[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                              re.IGNORECASE | re.MULTILINE)


def keyNames(raw: bytes, maxSignatures: int) -> list[str]:
    """The key records (``s._domainkey.d``) that L{verifyAll} will look up, as far as a
    scan of the header section finds them: for sending them to a process that does
    no DNS (L{twistmail.filters.dkimprocess}), which reports any it still lacks."""
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0),
              default=len(raw))
    names = []
    for match in itertools.islice(_SIGNATURE_FIELD.finditer(raw, 0, end + 1), maxSignatures):
        # The s= and d= tags as dkimpy's parse_tag_value reads them, without its checks
        # (a third of this function's time): what it refuses needs no key anyway.
        tags = {}
        for part in match.group(1).replace(b"\r\n", b"").replace(b"\n", b"").split(b";"):
            key, _, value = part.partition(b"=")
            tags.setdefault(key.strip(), value.strip())
        try:
            name = (tags[b"s"] + b"._domainkey." + tags[b"d"]).decode("ascii").rstrip(".")
        except (KeyError, UnicodeDecodeError):  # verifyAll says what is wrong with it
            continue
        if name not in names:
            names.append(name)
    return names


def verifyAll(raw: bytes, lookups: Lookups, maxSignatures: int,
              minimumBits: int = 1024) -> list[DKIMResult]:
    """A result for each of the first C{maxSignatures} signatures of C{raw}, top first.

    Blocking (DNS, hashing): run it in the DNS pool.  [] for an unsigned message.
    """
    try:
        message = _Verifier(raw, minimumBits)
    except Exception:  # dkimpy's header parser: MessageFormatError, IndexError, ...
        head = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].lower()
        if b"dkim-signature:" in head:
            return [DKIMResult("permerror", reason="malformed header section")]
        return []
    signatures = [value for name, value in message.headers if name.lower() == b"dkim-signature"]
    return [_verifyOne(message, index, value, lookups, minimumBits)
            for index, value in enumerate(signatures[:maxSignatures])]
