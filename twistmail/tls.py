# -*- test-case-name: tests.test_tls -*-
"""The server's TLS certificate: loaded from ``[tls]``, or generated; reloaded on SIGHUP.

Every listener (STARTTLS on SMTP, POP3 and IMAP; implicit TLS on 465, 995
and 993) asks L{ServerTLS} for a connection, so replacing the certificate
means swapping one context: connections already up keep the one they
started with, new ones get the new one.  TLS 1.2 is the minimum.

With no certificate configured, a self-signed one for the host name is
generated on first start (as Debian's postfix and dovecot packages do with
ssl-cert-snakeoil), so STARTTLS works out of the box; clients will warn
until a real one is configured.
"""

from __future__ import annotations

import datetime
import os

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from twistmail import _fsutil

log = Logger()


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message names the file and the fix."""


def generateSelfSigned(hostname: str, certPath: str, keyPath: str) -> None:
    """A 10-year self-signed certificate for C{hostname} (P-256), written atomically."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(keyPath), mode=0o700, exist_ok=True)
    _fsutil.atomicWrite(keyPath, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), mode=0o600)
    _fsutil.atomicWrite(certPath, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)


def loadOptions(certPath: str, keyPath: str) -> ssl.CertificateOptions:
    """CertificateOptions from PEM files: the certificate first, then its chain."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(certPath, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise TLSConfigError(f"{certPath}: {e.strerror}. Fix: check [tls] certificate") from None
    try:
        with open(keyPath, "rb") as f:
            keyPem = f.read()
    except OSError as e:
        raise TLSConfigError(f"{keyPath}: {e.strerror}. Fix: check [tls] key") from None
    try:
        chain = x509.load_pem_x509_certificates(pem)
        key = serialization.load_pem_private_key(keyPem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{certPath} / {keyPath}: not a PEM certificate and unencrypted "
                             f"key ({e}). Fix: point [tls] certificate and key at PEM files") from None
    try:
        options = ssl.CertificateOptions(
            privateKey=key, certificate=chain[0], extraCertChain=chain[1:],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        options.getContext()  # checks that the key matches the certificate
    except SSL.Error as e:
        raise TLSConfigError(f"{certPath} / {keyPath}: the key does not match the certificate "
                             f"({e}). Fix: configure the key that belongs to the certificate") from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The current certificate, for every TLS listener and STARTTLS."""

    def __init__(self, certPath: str, keyPath: str) -> None:
        self.certPath = certPath
        self.keyPath = keyPath
        self._alpnSelect = None
        self._install(loadOptions(certPath, keyPath))

    def _install(self, options: ssl.CertificateOptions) -> None:
        if self._alpnSelect is not None:
            options.getContext().set_alpn_select_callback(self._alpnSelect)
        self._options = options

    def answerALPN(self, select) -> None:
        """Let C{select} (OpenSSL's ALPN callback) answer TLS-ALPN-01 validations (RFC 8737),
        on this certificate and every later one."""
        self._alpnSelect = select
        self._install(self._options)

    @classmethod
    def fromConfig(cls, tlsConfig, hostname: str, dataDir: str) -> ServerTLS:
        certPath, keyPath = tlsConfig["certificate"], tlsConfig["key"]
        if not certPath:
            certPath = os.path.join(dataDir, "tls", "selfsigned.crt")
            keyPath = os.path.join(dataDir, "tls", "selfsigned.key")
            if not (os.path.exists(certPath) and os.path.exists(keyPath)):
                generateSelfSigned(hostname, certPath, keyPath)
                log.warn("tls: no [tls] certificate configured: generated a self-signed "
                         "certificate for {hostname} in {path}; clients will warn until "
                         "[tls] certificate and key name a real one", hostname=hostname,
                         path=certPath)
        return cls(certPath, keyPath)

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    def use(self, certPath: str, keyPath: str) -> None:
        """Serve this pair from now on (a renewed ACME certificate); SIGHUP rereads it.

        @raise TLSConfigError: the pair cannot be used; the current one stays.
        """
        self._install(loadOptions(certPath, keyPath))
        self.certPath, self.keyPath = certPath, keyPath

    def reload(self) -> bool:
        """Read the files again; on any problem keep serving the old certificate."""
        try:
            self._install(loadOptions(self.certPath, self.keyPath))
        except TLSConfigError as e:
            log.error("tls: reload failed, keeping the current certificate: {error}", error=e)
            return False
        log.info("tls: certificate reloaded from {path}", path=self.certPath)
        return True
