# -*- test-case-name: tests.test_proxy -*-
"""The PROXY protocol (HAProxy v1 and v2) in front of any listener marked ``haproxy:``.

Twisted's own ``HAProxyWrappingFactory`` builds the mail protocol when the TCP
connection arrives, with the load balancer's address, and greets before the
header is read; so connection limits, logs and the greeting would all see the
proxy.  Here the header is read first (Twisted's parsers decode it) and only
then is the wrapped factory asked for a protocol, with the real client's
address: limits, throttling, relay permission and Received: lines all see the
client, because the mail protocol's transport answers getPeer()/getHost() with
the addresses the header carried.  Put in front of an implicit-TLS factory,
the header comes first and the TLS handshake after it, as HAProxy sends them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet import address, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import directlyProvides, providedBy

from twistmail._logtext import loggable
from twistmail._netaddr import Networks

log = Logger()

#: The endpoint-string prefix that marks a listener as behind a PROXY-speaking balancer.
PREFIX = "haproxy:"
#: Seconds to wait for the whole header (Postfix: postscreen_upstream_proxy_timeout = 5s).
HEADER_TIMEOUT = 5.0
#: A v1 header is one line of at most 107 octets (PROXY protocol spec §2.1).
V1_MAX = 107
#: v2: 16 fixed octets, then addresses and TLVs; HAProxy's own TLVs fit easily.
V2_MAX = 16 + 4096
V2_SIGNATURE = V2Parser.PREFIX
V1_SIGNATURE = b"PROXY "


def splitMarked(description: str) -> tuple[bool, str]:
    """``haproxy:tcp:25`` -> (True, ``tcp:25``); any other endpoint string -> (False, it)."""
    if description.lower().startswith(PREFIX):
        return True, description[len(PREFIX):]
    return False, description


def parseHeader(header: bytes) -> ProxyInfo:
    """A complete v1 line (with its CRLF) or v2 header, decoded by Twisted's parsers.

    @raise InvalidProxyHeader: or ValueError, if it is not valid.
    """
    if header.startswith(V2_SIGNATURE):
        return V2Parser.parse(header)
    line = header[:-2]
    if line == b"PROXY UNKNOWN":  # spec §2.1: valid without addresses; Twisted wants a space
        return ProxyInfo(header, None, None)
    info = V1Parser.parse(line)
    for addr in (info.source, info.destination):
        # Twisted's v1 parser takes any word as an address; it would reach logs and
        # Received: headers.  ValueError for anything but an address of the named family.
        version = 4 if isinstance(addr, address.IPv4Address) else 6
        if ipaddress.ip_address(addr.host).version != version or not 0 <= addr.port < 65536:
            raise ValueError(f"not an IPv{version} address and port")
    return info


class _ProxiedTransport:
    """The connection's transport, but getPeer/getHost give the addresses from the header."""

    def __init__(self, transport, peer, host) -> None:
        self._transport = transport
        self._peer = peer
        self._host = host
        directlyProvides(self, providedBy(transport))

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def startTLS(self, contextFactory, *args) -> None:
        self._transport.startTLS(contextFactory, *args)
        directlyProvides(self, providedBy(self._transport))  # now an ISSLTransport

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class _HeaderReader(protocol.Protocol):
    """Reads the PROXY header, then hands the connection to the wrapped factory's protocol."""

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.wrapped: interfaces.IProtocol | None = None
        self._timer = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        if getattr(peer, "host", "") not in self.factory.trusted:
            log.warn("proxy client={client} result=refused: not in [server] proxy_networks",
                     client=getattr(peer, "host", "unknown"))
            self.transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        self._refuse("no complete PROXY header in time")

    def _refuse(self, why: str) -> None:
        log.info("proxy client={client} result=closed: {why} (got {data})",
                 client=getattr(self.transport.getPeer(), "host", "unknown"), why=why,
                 data=loggable(self.buffer[:V1_MAX]))
        self.buffer = b""
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self._timer is None:
            return  # refused, waiting for the close
        self.buffer += data
        try:
            header = self._header()
        except InvalidProxyHeader as e:
            self._refuse(str(e) or "not a PROXY header")
            return
        if header is None:
            return
        try:
            info = parseHeader(header)
        except (InvalidProxyHeader, ValueError) as e:
            self._refuse(f"invalid PROXY header ({type(e).__name__})")
            return
        self._timer.cancel()
        self._timer = None
        rest, self.buffer = self.buffer[len(header):], b""
        # v2 LOCAL (health checks) and v1 UNKNOWN carry no addresses, and a v2 AF_UNIX
        # pair is no client address: the connection's own.
        ip = isinstance(info.source, (address.IPv4Address, address.IPv6Address))
        peer = info.source if ip else self.transport.getPeer()
        host = info.destination if ip else self.transport.getHost()
        wrapped = self.factory.wrappedFactory.buildProtocol(peer)
        if wrapped is None:
            self.transport.loseConnection()
            return
        self.wrapped = wrapped
        wrapped.makeConnection(_ProxiedTransport(self.transport, peer, host))
        if rest:
            wrapped.dataReceived(rest)

    def _header(self) -> bytes | None:
        """The complete header at the start of the buffer, None if more is needed.

        @raise InvalidProxyHeader: the buffer cannot start with a valid header.
        """
        buf = self.buffer
        if buf.startswith(V2_SIGNATURE) or V2_SIGNATURE.startswith(buf):
            if len(buf) < 16:
                return None
            size = 16 + int.from_bytes(buf[14:16], "big")
            if size > V2_MAX:
                raise InvalidProxyHeader("v2 header too long")
            return buf[:size] if len(buf) >= size else None
        if not (buf.startswith(V1_SIGNATURE) or V1_SIGNATURE.startswith(buf)):
            raise InvalidProxyHeader("not a PROXY header")
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise InvalidProxyHeader("v1 header too long")
            return None
        return buf[:end + 2]

    def connectionLost(self, reason) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.wrapped is not None:
            wrapped, self.wrapped = self.wrapped, None
            wrapped.connectionLost(reason)


class ProxyHeaderFactory(protocol.Factory):
    """Wraps a listener's factory: each connection starts with a PROXY header from a
    balancer in C{networks}, or is closed."""

    noisy = False

    def __init__(self, wrappedFactory: protocol.Factory, networks: Sequence[str],
                 clock=None, timeout: float = HEADER_TIMEOUT) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.wrappedFactory = wrappedFactory
        #: the proxies allowed to send a header
        self.trusted = Networks(networks)
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr) -> _HeaderReader:
        return _HeaderReader(self)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
