# -*- test-case-name: tests.test_antispam_dnsbl,tests.test_antispam_greylist -*-
"""Who the source-reputation filters (DNSBL, greylisting) leave alone.

``[antispam] allow`` holds three kinds of entry: a network in CIDR notation
(the client's address), an address ``user@domain`` and a domain (the envelope
sender, or the recipient: postgrey's ``whitelist_recipients`` keeps
``postmaster@`` reachable, RFC 2142).  Besides these, a client in ``[relay]
trusted_networks`` and an authenticated session are never checked.

The allow list skips only DNSBL and greylisting: SPF/DKIM/DMARC and Rspamd
still run, because a sender address is easily forged and those filters are
what catch the forgery.  At connect only networks can match (nothing else is
known yet), so exempting a listed partner from DNSBL takes its network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from twistmail._dnsname import isHostName
from twistmail._netaddr import Networks


def parseEntries(entries: Iterable[str]) -> tuple[list[str], set[str], set[str]]:
    """(networks, addresses, domains) of C{entries}, lower-cased.

    @raise ValueError: an entry that is none of the three.
    """
    networks, addresses, domains = [], set(), set()
    for entry in entries:
        if "@" in entry:
            local, _, domain = entry.rpartition("@")
            if not local or not isHostName(domain):
                raise ValueError(f"{entry!r} is not an address user@domain")
            addresses.add(entry.lower())
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if not isHostName(entry):
                raise ValueError(f"{entry!r} is not a network (CIDR), an address or a "
                                 "domain") from None
            domains.add(entry.lower())
        else:
            networks.append(entry)
    return networks, addresses, domains


class AllowList:
    """C{[antispam] allow} plus C{[relay] trusted_networks}."""

    def __init__(self, allow: Iterable[str] = (), trusted: Iterable[str] = ()) -> None:
        networks, self._addresses, self._domains = parseEntries(allow)
        self._networks = Networks([*networks, *trusted])

    @classmethod
    def fromConfig(cls, config) -> AllowList:
        return cls(config["antispam"]["allow"], config["relay"]["trusted_networks"])

    def client(self, host: str) -> bool:
        """The client address is allowed (or trusted)."""
        return host in self._networks

    def mailbox(self, address: str | None) -> bool:
        """An envelope address, or its domain, is allowed."""
        if not address:
            return False
        address = address.lower()
        return address in self._addresses or address.rpartition("@")[2] in self._domains

    def session(self, session, recipient: str | None = None) -> bool:
        """Nothing to check for this session (and recipient): authenticated, trusted or allowed."""
        return bool(session.authenticated) or self.client(session.client) \
            or self.mailbox(session.sender) or self.mailbox(recipient)


def noOwnOptions(name: str, options: dict) -> None:
    """The filters configured in [antispam] take no [filters.<name>] options of their own."""
    if options:
        from twistmail.config import ConfigError

        raise ConfigError(f"[filters.{name}] {sorted(options)[0]}: unknown option. Fix: "
                          f"configure {name} in [antispam]; [filters.{name}] takes only "
                          "timeout and on_failure")
