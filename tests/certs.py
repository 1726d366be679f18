"""A throw-away CA and a server certificate it signed, for STARTTLS tests."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Certs:
    caPEM: bytes
    certPEM: bytes
    keyPEM: bytes

    def serverOptions(self, *clientAuthorities):
        """Server TLS options; with C{clientAuthorities} clients must present a certificate."""
        from twisted.internet import ssl

        return ssl.PrivateCertificate.loadPEM(self.certPEM + self.keyPEM).options(
            *clientAuthorities)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def makeCerts(hostname: str = "localhost") -> Certs:
    now = datetime.datetime.now(datetime.UTC)
    caKey = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: OpenSSL finds the issuer by name, so two test CAs in one
    # trust file must not share one.
    caName = _name(f"twistmail test CA {x509.random_serial_number():x}"[:64])
    ca = (x509.CertificateBuilder().subject_name(caName)
          .issuer_name(caName).public_key(caKey.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(caKey, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hostname)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(caKey, hashes.SHA256()))
    return Certs(ca.public_bytes(serialization.Encoding.PEM),
                 cert.public_bytes(serialization.Encoding.PEM),
                 key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()))
