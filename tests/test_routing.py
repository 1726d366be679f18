"""Relay permission and recipient routing (twistmail.delivery.routing)."""

from __future__ import annotations

import pytest
from support import addUser

from twistmail.auth.accounts import Accounts
from twistmail.delivery.routing import (
    LOCAL,
    BadAddress,
    Client,
    LocalRoute,
    RelayDenied,
    RelayPolicy,
    RelayRoute,
    Router,
    UnknownUser,
)


@pytest.mark.parametrize("address, trusted", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("10.1.2.3", True), ("10.2.0.1", False),
    ("::1", True), ("::ffff:127.0.0.1", True), ("::ffff:10.1.0.1", True), ("2001:db8::1", False),
    ("fe80::1%eth0", False), ("", False), ("unknown", False),
])
def test_trusted_networks(address, trusted):
    policy = RelayPolicy(["127.0.0.0/8", "::1/128", "10.1.0.0/16"])
    assert policy.relayAllowed(Client(address=address)) is trusted


def test_default_trusts_no_network_but_local_programs_and_authenticated_clients():
    policy = RelayPolicy([])
    assert not policy.relayAllowed(Client(address="127.0.0.1"))
    assert policy.relayAllowed(LOCAL)
    assert policy.relayAllowed(Client(address="203.0.113.5", authenticated="alice@example.test"))


@pytest.fixture
def router(dataDir):
    addUser(dataDir, "alice@example.test")
    return Router(Accounts(dataDir), RelayPolicy(["192.0.2.0/24"]))


def test_local_recipients_route_locally_for_anyone(router):
    outsider = Client(address="203.0.113.1")
    assert router.route("Alice+tag@Example.test", outsider) == LocalRoute(("alice@example.test",))
    with pytest.raises(UnknownUser):
        router.route("nobody@example.test", outsider)


def test_remote_recipients_need_relay_permission(router):
    with pytest.raises(RelayDenied):
        router.route("bob@remote.test", Client(address="203.0.113.1"))
    assert router.route("Bob@Remote.test", Client(address="192.0.2.8")) == RelayRoute("Bob@Remote.test")
    assert router.route('"john doe"@remote.test', LOCAL) == RelayRoute('"john doe"@remote.test')


@pytest.mark.parametrize("address", ["bob@[192.0.2.1]", "bob@remote..test", "bob@-bad-.test",
                                     "b\u00f6\u0085b@remote.test", "bob@re mote.test", "bo b@remote.test",
                                     "b\u00f6b@b\u00fc\u200dcher.test", "p\u0430ypal@remote.test"])
def test_unusable_remote_addresses_are_refused(router, address):
    with pytest.raises(BadAddress):
        router.route(address, LOCAL)


def test_utf8_remote_address_is_relayed_with_its_domain_as_an_a_label(router):
    """RFC 6531: the local part goes on as UTF-8 (NFC); MX lookup needs the A-label."""
    assert router.route("Jose\u0301@B\u00fccher.test", LOCAL) == \
        RelayRoute("Jos\u00e9@xn--bcher-kva.test")
