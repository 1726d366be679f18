"""Is this client address in these networks: one answer for every listener and the relay.

Client addresses come from C{transport.getPeer().host}: a dual-stack listener
reports an IPv4 client as C{::ffff:192.0.2.1}, a link-local IPv6 one with a
C{%zone}, a UNIX socket with no address at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parseHost(host: str) -> IPAddress | None:
    """The address in C{host}, IPv4-mapped IPv6 as IPv4, zone dropped; None if not an address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def isLoopback(host: str) -> bool:
    """C{host} is an address of this machine's loopback (127/8, ::1, IPv4-mapped too)."""
    address = parseHost(host)
    return address is not None and address.is_loopback


def sameHost(a: str, b: str) -> bool:
    """True if C{a} and C{b} are the same IP address (however each is written)."""
    first = parseHost(a)
    return first is not None and first == parseHost(b)


class Networks:
    """A set of CIDR networks; C{host in networks} for a client address string."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in cidrs]

    def __contains__(self, host: str) -> bool:
        address = parseHost(host)
        return address is not None and any(address in n for n in self._networks)
