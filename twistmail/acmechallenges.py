# -*- test-case-name: tests.test_acme -*-
"""What the challenge responders answer while an order is in flight.

The ACME order runs in a thread (twistmail.acmeissuer) and puts its answers
here; the listeners answer the CA from the reactor:

* HTTP-01 (RFC 8555 §8.3): token -> key authorization, served by
  twistmail.web.acmechallenge under ``/.well-known/acme-challenge/``;
* TLS-ALPN-01 (RFC 8737): name -> a certificate carrying the key
  authorization's digest, presented by L{ServerTLS} to a client that offers
  only the ``acme-tls/1`` protocol and names that host (SNI).

Keys are checked against their alphabet before any lookup, and each table is
bounded.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import threading
from typing import Any

#: Answers at once: one per name of an order in flight (Let's Encrypt allows 100 names).
MAX_ENTRIES = 200
#: RFC 8737 §6.2: the ALPN protocol of the validation handshake.
ACME_TLS_1 = b"acme-tls/1"
#: RFC 8737 §6.1: id-pe-acmeIdentifier.
ACME_IDENTIFIER = "1.3.6.1.5.5.7.1.31"


class _Table:
    """key -> answer, written from the order's thread, read by the reactor."""

    #: what a key may look like; anything else is never stored nor looked up
    pattern: re.Pattern

    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Any] = {}
        self._limit = limit

    def add(self, key: str, answer) -> None:
        """@raise ValueError: a malformed key. @raise OverflowError: the table is full."""
        if not self.pattern.match(key):
            raise ValueError(f"the CA sent a malformed challenge {key[:64]!r}")
        with self._lock:
            if key not in self._entries and len(self._entries) >= self._limit:
                raise OverflowError(f"more than {self._limit} challenges at once")
            self._entries[key] = answer

    def remove(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def get(self, key: str):
        if not self.pattern.match(key):
            return None
        with self._lock:
            return self._entries.get(key)


class ChallengeTokens(_Table):
    """HTTP-01: token -> key authorization."""

    #: RFC 8555 §8.3: "base64url ... MUST NOT contain any characters outside the base64url
    #: alphabet", with at least 128 bits of entropy (22 characters); 128 is ample.
    pattern = re.compile(r"^[A-Za-z0-9_-]{22,128}$")


class ALPNCertificates(_Table):
    """TLS-ALPN-01: host name -> (certificate, key) for the validation handshake."""

    pattern = re.compile(r"^[a-z0-9.-]{1,253}$")

    def select(self, connection, protocols: list[bytes]):
        """OpenSSL's ALPN callback on every TLS listener.

        A client offering ``acme-tls/1`` for a name being validated gets the
        challenge certificate (RFC 8737 §3); certificates may be replaced here,
        before the server's certificate is sent (mod_md does the same).  Anyone
        else gets no protocol selected, as without this callback.
        """
        from OpenSSL import SSL

        if ACME_TLS_1 in protocols:
            name = (connection.get_servername() or b"").decode("ascii", "replace").lower()
            answer = self.get(name)
            if answer is not None:
                connection.use_certificate(answer[0])
                connection.use_privatekey(answer[1])
                return ACME_TLS_1
        return SSL.NO_OVERLAPPING_PROTOCOLS


def challengeCertificate(name: str, keyAuthorization: str):
    """RFC 8737 §3: a self-signed certificate for C{name} alone, with the critical
    acmeIdentifier extension holding SHA-256 of the key authorization."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(keyAuthorization.encode("ascii")).digest()
    subject = x509.Name([])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # The extension's value is an ASN.1 OCTET STRING (tag 4, length 32) of the digest.
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(ACME_IDENTIFIER),
                                                  b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256()))
    return certificate, key
