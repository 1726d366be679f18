# -*- test-case-name: tests.test_antispam_dnsbl -*-
"""The ``dnsbl`` filter: refuse clients listed on DNS block lists, at connect.

For each zone in ``[antispam] dnsbl`` the client's address is looked up as an
A record under the zone (RFC 5782 §2.1: IPv4 octets reversed; §2.4: IPv6
nibbles reversed), all zones at once, through the shared resolver's thread
pool.  A listed client is told Postfix's ``554 5.7.1 Service unavailable;
client [ip] blocked using <zone>`` before it may send anything (as
postscreen does).

Not a listing: an answer outside 127.0.0.0/8 (a resolver that rewrites
NXDOMAIN), 127.255.255.0/24 (Spamhaus's codes for a refused query, e.g. one
that came through a public resolver), and any DNS error (a list that is down
must not stop mail).  Clients in ``[antispam] allow`` networks or ``[relay]
trusted_networks``, and authenticated sessions, are not looked up.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from twistmail._netaddr import parseHost
from twistmail.filters.allowlist import AllowList, noOwnOptions
from twistmail.filters.base import Filter
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import Verdict
from twistmail.relay.mx import DNSFailure

log = Logger()

#: RFC 5782 §2.3: a listing is an A record in 127.0.0.0/8 ...
LISTED = ipaddress.ip_network("127.0.0.0/8")
#: ... but 127.255.255.0/24 are Spamhaus's "query refused / error" codes.
REFUSED = ipaddress.ip_network("127.255.255.0/24")


def queryName(address: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """The name to look up for C{address} under C{zone} (RFC 5782 §2.1, §2.4)."""
    # reverse_pointer: "4.3.2.1.in-addr.arpa" or 32 reversed nibbles + ".ip6.arpa".
    return address.reverse_pointer.rsplit(".", 2)[0] + "." + zone


class DnsblFilter(Filter):
    """Looks the client up on every zone at connect; the first zone (in configured order)
    that lists it is named in the reply."""

    name = "dnsbl"

    def __init__(self, zones, allow: AllowList, resolver) -> None:
        self.zones = list(zones)
        self.allow = allow
        self.resolver = resolver

    def connect(self, session):
        address = parseHost(session.client)
        if not self.zones or address is None or self.allow.session(session):
            return None
        lookups = [self.resolver.run(self._listing, queryName(address, zone), zone)
                   for zone in self.zones]
        d = defer.gatherResults(lookups, consumeErrors=True)
        d.addCallback(self._verdict, str(address))
        return d

    def _listing(self, name: str, zone: str) -> str | None:
        """In a DNS worker thread: the listing's address, or None."""
        try:
            records = self.resolver.resolveSync(name, "A")
        except DNSFailure as e:
            if e.temporary:
                log.warn("dnsbl zone={zone} lookup failed, not blocking: {error}",
                         zone=zone, error=e.text)
            return None  # NXDOMAIN: not listed
        for record in records:
            answer = ipaddress.ip_address(record.address)
            if answer in REFUSED:
                log.warn("dnsbl zone={zone} refused the query ({answer}): not blocking; "
                         "a public resolver is often why", zone=zone, answer=str(answer))
            elif answer in LISTED:
                return str(answer)
            else:
                log.warn("dnsbl zone={zone} answered {answer}, outside 127/8: not a listing",
                         zone=zone, answer=str(answer))
        return None

    def _verdict(self, answers: list, client: str) -> Verdict | None:
        for zone, answer in zip(self.zones, answers, strict=True):
            if answer is not None:
                log.info("dnsbl client={client} listed in zone={zone} ({answer}) result=rejected",
                         client=client, zone=zone, answer=answer)
                # Postfix's wording (reject_rbl_client, postscreen).
                return Verdict.reject(
                    f"5.7.1 Service unavailable; client [{client}] blocked using {zone}", 554)
        return None


@implementer(IPlugin, IMessageFilterFactory)
class DnsblFilterFactory:
    name = "dnsbl"
    description = "refuse clients listed on the DNS block lists of [antispam] dnsbl (554 5.7.1)"

    def makeFilter(self, options: dict, context) -> DnsblFilter:
        noOwnOptions(self.name, options)
        return DnsblFilter(context.config["antispam"]["dnsbl"], AllowList.fromConfig(context.config),
                           context.resolver)

