# -*- test-case-name: tests.test_verify_filter -*-
"""SPF (RFC 7208): pyspf's check_host(), with its DNS through our resolver.

pyspf implements the whole evaluation (mechanisms, macros, ``ptr``,
``include``/``redirect``, the 10-lookup and 2-void-lookup limits of §4.6.4).
All of its DNS goes through one method, ``query.dns``; L{_Query} overrides it
per query object, so lookups use the shared resolver (its servers, timeout and
cache) and the message's time limit.  pyspf's module-level ``DNSLookup`` (the
system resolver) is never called nor replaced.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import spf as pyspf

from twistmail._dnsname import isHostName
from twistmail.filters.lookups import Lookups
from twistmail.relay.mx import DNSFailure


@dataclass(frozen=True)
class SPFResult:
    result: str  # RFC 7208 §2.6: pass fail softfail neutral none permerror temperror
    identity: str  # "mailfrom" or "helo" (RFC 7208 §2.3, §2.4)
    domain: str  # the domain checked
    sender: str  # the address checked: MAIL FROM, or postmaster@<HELO>


def _value(qtype: str, rdata):
    """One record in the form pyspf's own DNS drivers return it."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(True))
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return tuple(rdata.strings)  # TXT: the strings of one record, joined by pyspf


class _Query(pyspf.query):
    def __init__(self, lookups: Lookups, **kwargs) -> None:
        super().__init__(**kwargs)
        self._lookups = lookups

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        """pyspf's query.dns: a list of records; [] counts as a void lookup.

        dnspython follows CNAMEs itself, so ``cnames`` is not needed here.
        """
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # as pyspf: an invalid name has no records
        key = (name, qtype)
        if key in self.cache:
            return self.cache[key]
        try:
            result = [_value(qtype, r) for r in self._lookups.records(name, qtype)]
        except DNSFailure as e:  # temporary: SERVFAIL, timeout, our time limit
            raise pyspf.TempError(e.text) from None
        self.cache[key] = result
        if not result and not ignore_void:
            # RFC 7208 §4.6.4: more than two lookups that find nothing -> permerror.
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded")
        return result


def checkHost(lookups: Lookups, client: str, sender: str, helo: str, receiver: str,
              identity: str = "mailfrom") -> SPFResult:
    """check_host() for the MAIL FROM identity, or for the HELO identity.

    Blocking: run it in the DNS pool.  For ``<>`` the MAIL FROM identity is
    ``postmaster@<HELO>`` (RFC 7208 §2.4).  A HELO that is not a domain name
    (an address literal, one label) gives ``none`` without a lookup (§2.3).
    """
    if identity == "helo" or not sender:
        identity, address = "helo", f"postmaster@{helo}"
    else:
        address = sender
    domain = address.rpartition("@")[2].rstrip(".").lower()
    try:
        ipaddress.ip_address(client)
    except ValueError:
        return SPFResult("none", identity, domain, address)  # a local program: no client
    if not isHostName(domain, minLabels=2):
        # RFC 7208 §4.3: a malformed domain or one that is not fully qualified -> none.
        return SPFResult("none", identity, domain, address)
    query = _Query(lookups, i=client, s="" if identity == "helo" else address, h=helo,
                   receiver=receiver, strict=True)
    # The explanation (exp=) is the sender's text: not repeated in our header.
    result, _, _ = query.check()
    return SPFResult(result, identity, domain, address)
