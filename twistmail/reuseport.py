"""TCP listeners that several processes on one host share (``[server] reuse_port``).

Python runs one core per process, so a host's cores serve mail through several
twistmail processes (nodes sharing PostgreSQL storage) on the same ports.  With
SO_REUSEPORT (Linux 3.9+) each process binds the port itself and the kernel
spreads new connections across them, with no balancer in front.  Twisted's TCP
endpoints do not set the option, so we create the listening socket here and
hand it to the reactor (C{IReactorSocket.adoptStreamPort}).
"""

from __future__ import annotations

import socket

from twisted.internet import abstract, defer, endpoints, interfaces
from twisted.internet.error import CannotListenError
from zope.interface import implementer


@implementer(interfaces.IStreamServerEndpoint)
class ReusePortEndpoint:
    """Listen on C{interface}:C{port} with SO_REUSEADDR and SO_REUSEPORT set."""

    def __init__(self, reactor, port: int, backlog: int = 50, interface: str = "") -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory) -> defer.Deferred:
        family = socket.AF_INET6 if abstract.isIPv6Address(self._interface) else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((self._interface, self._port))
                sock.listen(self._backlog)
                sock.setblocking(False)
                # The reactor listens on a duplicate of the descriptor; ours is closed.
                return defer.succeed(self._reactor.adoptStreamPort(sock.fileno(), family,
                                                                   factory))
            finally:
                sock.close()
        except OSError as e:
            return defer.fail(CannotListenError(self._interface, self._port, e))


def sharing(reactor, endpoint):
    """C{endpoint} made to share its port if it is a TCP one (``tcp:``); others (unix:,
    systemd:) as they are."""
    if isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        # The parsed string's port, backlog and interface: Twisted keeps them private.
        return ReusePortEndpoint(reactor, endpoint._port, endpoint._backlog, endpoint._interface)
    return endpoint
