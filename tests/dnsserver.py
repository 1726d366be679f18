"""An authoritative DNS server on loopback for relay tests (twisted.names).

Zones are plain dicts, so a test states exactly what DNS says::

    dns = startDNS({
        "example.net": [MX(10, "mx1.example.net"), MX(20, "mx2.example.net")],
        "mx1.example.net": [A("127.0.0.2")],
        "nomail.test": [MX(0, "")],            # RFC 7505 null MX
    }, servfail={"broken.test"}, hang={"slow.test"})
    ... [relay] nameservers = [f"127.0.0.1:{dns.port}"]

A name that is not in the dict (and has no names under it) is NXDOMAIN; a
name that is present without records of the asked type is NODATA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from support import onReactor
from twisted.internet import defer, reactor
from twisted.names import common, dns, error, server


def MX(preference: int, exchange: str) -> dns.Record_MX:
    return dns.Record_MX(preference, exchange.encode(), ttl=60)


def A(address: str) -> dns.Record_A:
    return dns.Record_A(address, ttl=60)


def AAAA(address: str) -> dns.Record_AAAA:
    return dns.Record_AAAA(address, ttl=60)


def PTR(name: str) -> dns.Record_PTR:
    return dns.Record_PTR(name.encode(), ttl=60)


def TXT(*strings: str) -> dns.Record_TXT:
    """One TXT record; several strings are joined by the reader (RFC 7208 §3.3)."""
    return dns.Record_TXT(*(t.encode() for t in strings), ttl=60)


def SRV(priority: int, weight: int, port: int, target: str) -> dns.Record_SRV:
    return dns.Record_SRV(priority, weight, port, target.encode(), ttl=60)


def CNAME(target: str) -> dns.Record_CNAME:
    return dns.Record_CNAME(target.encode(), ttl=60)


class ServerFailure(Exception):
    pass


class ZoneResolver(common.ResolverBase):
    def __init__(self, zone: dict, servfail: set, hang: set, queries: list) -> None:
        super().__init__()
        self.zone = {name.lower(): list(records) for name, records in zone.items()}
        self.servfail = {n.lower() for n in servfail}
        self.hang = {n.lower() for n in hang}
        self.queries = queries

    def _lookup(self, name, cls, type, timeout):
        name = name.decode().lower().rstrip(".")
        self.queries.append((name, dns.QUERY_TYPES.get(type, type)))
        if name in self.hang:
            return defer.Deferred()  # never answers: the client times out
        if name in self.servfail:
            return defer.fail(ServerFailure(name))  # not a DomainError: SERVFAIL
        if name not in self.zone and not any(n.endswith("." + name) for n in self.zone):
            return defer.fail(error.AuthoritativeDomainError(name))
        answers = [dns.RRHeader(name.encode(), r.TYPE, dns.IN, r.ttl, r, auth=True)
                   for r in self.zone.get(name, []) if r.TYPE == type or type == dns.ALL_RECORDS]
        return defer.succeed((answers, [], []))


@dataclass
class DNSServer:
    port: int
    resolver: ZoneResolver
    listening: object = field(repr=False)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def queries(self) -> list:
        return self.resolver.queries

    def stop(self) -> None:
        onReactor(self.listening.stopListening)


def startDNS(zone: dict, servfail=(), hang=(), port: int = 0) -> DNSServer:
    resolver = ZoneResolver(zone, set(servfail), set(hang), [])

    def listen():
        factory = server.DNSServerFactory(authorities=[resolver])
        factory.noisy = False
        protocol = dns.DNSDatagramProtocol(factory)
        protocol.noisy = False
        return reactor.listenUDP(port, protocol, interface="127.0.0.1")

    port = onReactor(listen)
    return DNSServer(port.getHost().port, resolver, port)
