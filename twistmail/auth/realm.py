"""The cred realm: an authenticated address becomes a protocol-specific avatar."""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import implementer


@implementer(IRealm)
class MailRealm:
    """Builds avatars through per-interface adapters registered by makeService.

    Each adapter is ``f(account: IMailAccount) -> Deferred[(avatar, logout)]``;
    keeping them injected means the realm never imports protocol code.
    """

    def __init__(self, store, adapters: dict[type, Callable] | None = None) -> None:
        self._store = store
        self._adapters = dict(adapters or {})

    def register(self, interface: type, adapter: Callable) -> None:
        """Serve logins asking for C{interface} with C{adapter} (called by makeService)."""
        self._adapters[interface] = adapter

    def requestAvatar(self, avatarId, mind, *interfaces):
        for iface in interfaces:
            adapter = self._adapters.get(iface)
            if adapter is not None:
                account = self._store.account(avatarId)
                d = defer.maybeDeferred(adapter, account)
                return d.addCallback(lambda result, iface=iface: (iface, result[0], result[1]))
        raise NotImplementedError(f"no avatar for {interfaces!r}")
