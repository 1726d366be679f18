# -*- test-case-name: tests.test_dkimsign -*-
"""DKIM-sign a message we send: Ed25519 and RSA together (RFC 8463), with dkimpy.

One signer serves the submission filter, ``twistmail sendmail`` and the
messages the server writes itself (bounces, TLS reports).  d= is the domain
of the From address (or the nearest parent with keys); a message whose From
is missing, doubled or names a domain without keys is not signed.

Signing hashes the whole message: blocking, so the server calls it in a
worker thread (L{Signer.signLater}); the CLI calls L{Signer.headers} directly.
"""

from __future__ import annotations

import base64
import email.utils
import re
import types
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from twisted.internet import defer, threads
from twisted.logger import Logger

from twistmail._logtext import loggable
from twistmail.dkimkeys import KeyRing, KeySet

log = Logger()

#: RFC 6376 §5.4.1: the fields that SHOULD be signed when present, plus the
#: ones that change how the body is read (§5.4: MIME headers) and Message-ID.
SIGNED = ("from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from",
          "resent-to", "resent-cc", "in-reply-to", "references", "list-id", "list-help",
          "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
          "message-id", "mime-version", "content-type", "content-transfer-encoding")
#: RFC 6376 §8.15: an added From (the DKIM replay / From-spoofing trick) breaks the
#: signature when h= lists From once more than the message has it (over-signing).
OVERSIGNED = ("from",)
#: Messages hashed at once per signer (the rest wait, on disk, not in memory).
CONCURRENCY = 2
_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


def _crlf(message: bytes) -> bytes:
    """The message with CRLF line ends, as it goes on the wire (RFC 5321 §2.3.8)."""
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _headerSection(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def headerList(message: bytes) -> list[bytes]:
    """The h= list: each field of L{SIGNED} as often as present, From once more."""
    present = [m.group(1).lower() for m in _NAME.finditer(_headerSection(message))]
    names = [n for n in present if n.decode("ascii", "replace") in SIGNED]
    return names + [n.encode() for n in OVERSIGNED]


def fromDomain(message: bytes) -> str | None:
    """The domain of the one address in the one From field; None otherwise
    (RFC 5322 §3.6: exactly one From; a From with several mailboxes needs a
    Sender, and which domain signs would be a guess)."""
    head = _headerSection(message)
    fields = re.findall(rb"^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M | re.I)
    if len(fields) != 1:
        return None
    value = fields[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [a for _, a in email.utils.getaddresses([value]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rsplit("@", 1)[1].lower()


def _privateKeys(keys: KeySet) -> list[tuple[bytes, bytes]]:
    """(algorithm tag, key in the form dkimpy takes): Ed25519 raw, base64 (RFC 8463 §3)."""
    raw = keys.ed25519.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
    pem = keys.rsa.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    return [(b"ed25519-sha256", base64.b64encode(raw)), (b"rsa-sha256", pem)]


class _PrehashedRSA:
    """An RSA key with the C{sign(digest) -> .signature} shape dkimpy uses for Ed25519."""

    def __init__(self, key) -> None:
        self._key = key

    def sign(self, digest: bytes):
        signature = self._key.sign(digest, padding.PKCS1v15(),
                                   asym_utils.Prehashed(hashes.SHA256()))
        return types.SimpleNamespace(signature=signature)


class _DKIM(dkim.DKIM):
    """dkimpy with the RSA signature made by OpenSSL (cryptography).

    dkimpy's own RSA is pure-Python modular exponentiation: ~15 ms a signature,
    holding the GIL, which capped signed submission near 60 messages a second.
    Its Ed25519 branch signs the header hash with any C{key.sign(digest)}; so
    for the RSA signature that branch runs with an RSA key (RFC 8017 §8.2.1
    RSASSA-PKCS1-v1_5 over SHA-256, what a=rsa-sha256 means, RFC 6376 §3.3.1).
    """

    rsaKey = None

    def gen_header(self, fields, include_headers, canon_policy, header_name, pk,
                   standardize=False):
        if self.rsaKey is None or self.signature_algorithm != b"rsa-sha256":
            return super().gen_header(fields, include_headers, canon_policy, header_name, pk,
                                      standardize)
        self.signature_algorithm = b"ed25519-sha256"  # the branch; a= is already in fields
        try:
            return super().gen_header(fields, include_headers, canon_policy, header_name,
                                      _PrehashedRSA(self.rsaKey), standardize)
        finally:
            self.signature_algorithm = b"rsa-sha256"


class Signer:
    """Signs with the keys a L{KeyRing} holds for the From domain."""

    def __init__(self, keys: KeyRing, run: Callable | None = None,
                 concurrency: int = CONCURRENCY) -> None:
        """@param run: C{run(f, *args) -> Deferred}, the worker pool (default: the reactor's).
        @param concurrency: messages signed at once (each is in memory meanwhile).
        """
        self._keys = keys
        self._run = run or threads.deferToThread
        self._limit = defer.DeferredSemaphore(concurrency)

    def inThread(self, f: Callable, *args) -> defer.Deferred:
        """C{f(*args)} in the worker pool, at most C{concurrency} at once: signing reads
        the whole message into memory, so ten big ones at once would hold ten copies."""
        return self._limit.run(self._run, f, *args)

    def headers(self, message: bytes) -> list[tuple[str, str]]:
        """The DKIM-Signature fields (name, folded value) to prepend; [] when not signing.

        Blocking: reads keys (rarely) and hashes the message.
        """
        message = _crlf(message)
        domain = fromDomain(message)
        keys = self._keys.forAddressDomain(domain) if domain else None
        if keys is None:
            return []
        include = headerList(message)
        fields = []
        signer = _DKIM(message)  # parsed once for both signatures
        signer.rsaKey = keys.rsa
        for algorithm, key in _privateKeys(keys):
            selector = keys.selector("ed25519" if algorithm.startswith(b"ed") else "rsa")
            signed = signer.sign(selector.encode(), keys.domain.encode(), key,
                                 signature_algorithm=algorithm,
                                 canonicalize=(b"relaxed", b"relaxed"),  # RFC 6376 §3.4
                                 include_headers=include)
            name, value = signed.decode("ascii").split(":", 1)
            fields.append((name, value.strip()))  # folded with CRLF, as on the wire
        return fields

    def sign(self, message: bytes) -> bytes:
        """C{message} with its signatures prepended (or unchanged); blocking."""
        try:
            fields = self.headers(message)
        except Exception as e:  # a broken key file: send unsigned, say why
            log.error("dkim: not signed: {error}", error=loggable(str(e)))
            return message
        newline = b"\r\n" if b"\r\n" in message[:1000] else b"\n"
        head = b"".join(f"{n}: {v}".encode().replace(b"\r\n", newline) + newline
                        for n, v in fields)
        return head + message

    def signLater(self, message: bytes) -> defer.Deferred:
        """L{sign} in the worker pool: for the server, which must not hash on the reactor."""
        return self.inThread(self.sign, message)


def unsigned(message: bytes) -> defer.Deferred:
    """The stand-in for L{Signer.signLater} when nothing signs."""
    return defer.succeed(message)
