# -*- test-case-name: tests.test_tls -*-
"""What every listener decides the same way: is this connection encrypted, may it send passwords.

RFC 3501 §6.2.3, RFC 2595 and RFC 6409 ask for no plaintext passwords on an
unencrypted connection; like Dovecot's ``disable_plaintext_auth``, the
networks in ``[auth] plaintext_networks`` (loopback by default: local
webmail, scripts, the test suite) are trusted not to be sniffed.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import ISSLTransport

from twistmail.tls import ServerTLS


def isSecure(transport) -> bool:
    """True on an implicit-TLS listener, or after STARTTLS."""
    return ISSLTransport.providedBy(transport)


class Security:
    def __init__(self, tls: ServerTLS | None, plaintextNetworks=()) -> None:
        self.tls = tls
        self._networks = [ipaddress.ip_network(n, strict=False) for n in plaintextNetworks]

    def passwordsAllowed(self, peerHost: str, secure: bool) -> bool:
        if secure:
            return True
        try:
            address = ipaddress.ip_address(peerHost)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)
