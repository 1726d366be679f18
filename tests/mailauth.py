"""Test keys, DNS records and signed messages for SPF, DKIM and DMARC tests.

Messages are signed with dkimpy, as a sending domain would sign them; the
records go into a zone for the loopback DNS server (tests/dnsserver.py).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsserver import TXT
from support import onReactor
from twisted.internet import defer, threads

from twistmail.model import FilterContext, FilterMessage, SessionInfo
from twistmail.relay.mx import DnsPythonMXResolver

#: Our host name: the authserv-id of the Authentication-Results header.
HOST = "mx.receiver.example"

#: A 512-bit RSA key (cryptography refuses to make one; openssl genrsa 512 made it).
WEAK_RSA_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA0Ufdiwss5OAjcKZ9
rkFhTafAK7dbHBvZatNqjzZkQS/UUyUtmgk3ilFkNDW27SOHl0uEPev6F8+5YCln
HhIP/QIDAQABAkBLBU0Im+/y99ocdsJU5gEAemLsCOVzNRSCM9leDyxvJRT3VCR/
h48c+M5cs/BcSgsbCYvuafQdCv2UQwqGzixhAiEA872PcFmp1cuXVRWekjrY/T5W
4y3pr8sVSYU6sgI6K6UCIQDbzpibZgJ9bZyGYU8BY1xdBswJ5tS5hidSj8q03uaD
eQIgcuvJmbts7DTV4XQUE/ZTIPQnm22mZRBntQZwKkYKj1ECIQDFrKQ9jJ3MoxjT
GQvuGadk2coBVaAVQHp4m2wXASaZMQIgaVisQAdVXQTe7ojdD7d2c8hEXLRD4dAp
g2ISDZUnaSo=
-----END PRIVATE KEY-----
"""


class RSAKey:
    def __init__(self, pem: bytes | None = None, bits: int = 1024) -> None:
        if pem is None:
            key = rsa.generate_private_key(65537, bits)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.pem = pem
        public = serialization.load_pem_private_key(pem, None).public_key()
        self.p = base64.b64encode(public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
        self.algorithm = b"rsa-sha256"

    def record(self) -> object:
        return TXT(f"v=DKIM1; k=rsa; p={self.p}")

    @property
    def private(self) -> bytes:
        return self.pem


class Ed25519Key:
    """RFC 8463: the record holds the raw 32-byte public key, base64."""

    def __init__(self) -> None:
        key = nacl.signing.SigningKey.generate()
        self.private = base64.b64encode(bytes(key))
        self.p = base64.b64encode(bytes(key.verify_key)).decode()
        self.algorithm = b"ed25519-sha256"

    def record(self) -> object:
        return TXT(f"v=DKIM1; k=ed25519; p={self.p}")


def message(fromHeader: str = "Alice <alice@good.example>", body: str = "Hello.\r\n",
            extra: str = "") -> bytes:
    return (f"From: {fromHeader}\r\nTo: bob@receiver.example\r\nSubject: test\r\n"
            f"Date: Fri, 04 Dec 2026 08:00:00 +0000\r\nMessage-ID: <1@good.example>\r\n{extra}"
            f"\r\n{body}").encode()


def sign(raw: bytes, key, domain: str, selector: str, length: bool = False) -> bytes:
    """C{raw} with a DKIM-Signature of C{domain}/C{selector} prepended (relaxed/relaxed)."""
    header = dkim.sign(raw, selector.encode(), domain.encode(), key.private,
                       signature_algorithm=key.algorithm, canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
                       length=length)
    return header + raw


def filterMessage(raw: bytes) -> FilterMessage:
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
    return FilterMessage(headers, len(raw), lambda: io.BytesIO(raw))


def session(client: str = "192.0.2.10", sender: str = "bob@good.example",
            helo: str = "mail.good.example", **kwargs) -> SessionInfo:
    return SessionInfo(role="inbound", client=client, helo=helo, sender=sender,
                       recipients=("bob@receiver.example",), id="T1", **kwargs)


def resolverFor(server, timeout: float = 2) -> DnsPythonMXResolver:
    return DnsPythonMXResolver([("127.0.0.1", server.port)], timeout, threads.deferToThread)


def makeVerifier(server, timeout: float = 2, **options):
    """The spf-dkim-dmarc filter, built as the engine builds it, on C{server}'s DNS."""
    from twisted.internet import reactor

    from twistmail.filters.spfdkimdmarc import SpfDkimDmarcFactory

    context = FilterContext(HOST, "/nonexistent", resolverFor(server, timeout), reactor)
    return SpfDkimDmarcFactory().makeFilter(options, context)


def runHook(filter, sessionInfo: SessionInfo, raw: bytes):
    """The verdict of C{filter}.endOfData, called on the reactor thread as the engine calls it."""
    return onReactor(lambda: defer.maybeDeferred(filter.endOfData, sessionInfo,
                                                 filterMessage(raw)))


def authResults(verdict) -> str:
    """The one Authentication-Results value of C{verdict}, unfolded."""
    values = [v for name, v in verdict.headers if name == "Authentication-Results"]
    assert len(values) == 1, verdict.headers
    return " ".join(values[0].split())
