# -*- test-case-name: tests.test_routing -*-
"""Where a recipient goes: a local account, or the relay queue, or nowhere.

RFC 5321 §3.6.2 leaves relaying to local policy; ours is Postfix's
``permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination``:
a client may relay only if it is a local program (``twistmail sendmail``),
has authenticated (SMTP AUTH sets ``Client.authenticated``), or
connects from ``[relay] trusted_networks``.  Mail *to* our domains is always
accepted, so the MX role is unaffected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from twistmail._dnsname import isHostName
from twistmail._netaddr import Networks
from twistmail.auth.accounts import NotLocal, UnknownUser
from twistmail.eai import AddressError, asciiDomain, canonicalLocal, decodePath

__all__ = ["BadAddress", "Client", "LocalRoute", "RelayDenied", "RelayPolicy", "RelayRoute",
           "Router", "UnknownUser"]

# RFC 5321 §4.1.2 Domain, LDH labels only: no address literals, no trailing junk.
# Printable ASCII; spaces only inside a quoted string (RFC 5321 §4.1.2 Quoted-string).
_LOCALPART_CHARS = re.compile(r'^(?:[\x21-\x7e]{1,64}|"[\x20-\x7e]{1,62}")$')


class RelayDenied(Exception):
    """The domain is not ours and this client may not relay."""


class BadAddress(Exception):
    """A remote address we could not hand to another MTA unchanged."""


@dataclass(frozen=True)
class Client:
    """Who is submitting: what relay permission depends on.

    An SMTP session builds one per connection; SMTP AUTH replaces it
    with ``dataclasses.replace(client, authenticated=identity)``.
    """

    address: str = ""  # IP address of an SMTP client
    authenticated: str | None = None  # SASL identity once AUTH succeeded
    local: bool = False  # a program on this machine (twistmail sendmail)


#: Local programs (``twistmail sendmail``) and the queue runner itself.
LOCAL = Client(local=True)


class RelayPolicy:
    """Decides whether a client may send to domains that are not ours."""

    def __init__(self, trustedNetworks: Sequence[str] = ()) -> None:
        self._networks = Networks(trustedNetworks)

    def trusted(self, address: str) -> bool:
        return address in self._networks

    def relayAllowed(self, client: Client) -> bool:
        return client.local or client.authenticated is not None or self.trusted(client.address)


@dataclass(frozen=True)
class LocalRoute:
    accounts: tuple  # canonical account addresses the recipient reaches


@dataclass(frozen=True)
class RelayRoute:
    address: str  # the remote recipient, as given


def remoteDomain(address: str) -> str:
    """The domain of a remote address, lower-cased (the unit of MX lookup and concurrency)."""
    return address.rpartition("@")[2].lower().rstrip(".")


def checkRemoteAddress(address: str) -> str:
    """C{address} if another MTA can be given it; BadAddress otherwise.  A UTF-8
    local part (RFC 6531, L{twistmail.eai}) is passed on NFC-normalised, an
    internationalised domain as its A-label (what MX lookup needs; RFC 6531 §3.2
    lets either form go to the next hop)."""
    local, at, domain = address.rpartition("@")
    if not domain.isascii() or not local.isascii():
        try:
            domain = asciiDomain(domain)
            local = decodePath(local.encode("utf-8"))
            canonicalLocal(local)  # its length and script; the case is the next hop's
        except (AddressError, UnicodeError):
            raise BadAddress(address) from None
        address = f"{local}@{domain}"
    ascii = local.encode("ascii", "replace").decode()
    if not at or not _LOCALPART_CHARS.match(ascii) or not isHostName(domain.rstrip(".")):
        raise BadAddress(address)
    return address


class Router:
    """Routes one recipient address for one client."""

    def __init__(self, accounts, policy: RelayPolicy, delimiter: str = "+") -> None:
        self.accounts = accounts
        self.policy = policy
        self.delimiter = delimiter

    def route(self, address: str, client: Client) -> LocalRoute | RelayRoute:
        """@raise UnknownUser: our domain, nobody there.
        @raise RelayDenied: not our domain and C{client} may not relay.
        @raise BadAddress: not our domain, relaying allowed, but not a usable address.
        """
        try:
            return LocalRoute(tuple(self.accounts.route(address, self.delimiter)))
        except NotLocal:
            pass
        if not self.policy.relayAllowed(client):
            raise RelayDenied(address)
        return RelayRoute(checkRemoteAddress(address))
