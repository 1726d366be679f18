# -*- test-case-name: tests.test_plaintext -*-
"""What every listener decides the same way: is this connection encrypted, may it send passwords.

RFC 3501 §6.2.3, RFC 2595 §4 and RFC 6409 ask for no plaintext passwords on an
unencrypted connection.  Like Dovecot's ``disable_plaintext_auth``, a client
whose address is the listener's own (local IP == remote IP: it is this host)
counts as secure; so do the networks in ``[auth] plaintext_networks`` (none by
default).  Another loopback address, such as 127.0.0.2 talking to 127.0.0.1,
does not: it may be a container or a proxy forwarding a remote client.
"""

from __future__ import annotations

from twisted.internet.interfaces import ISSLTransport

from twistmail._netaddr import Networks, sameHost
from twistmail.tls import ServerTLS


def isSecure(transport) -> bool:
    """True on an implicit-TLS listener, or after STARTTLS."""
    return ISSLTransport.providedBy(transport)


def listenerHost(transport) -> str:
    """The listener's own address for this connection ('' when it has none, as on a UNIX socket)."""
    return getattr(transport.getHost(), "host", "")


class Security:
    """TLS for a listener, and who may send a password without it."""

    def __init__(self, tls: ServerTLS | None = None, plaintextNetworks=()) -> None:
        self.tls = tls
        self._networks = Networks(plaintextNetworks)

    def passwordsAllowed(self, peerHost: str, localHost: str, secure: bool) -> bool:
        return secure or sameHost(peerHost, localHost) or peerHost in self._networks
