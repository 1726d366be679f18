# -*- test-case-name: tests.test_quota,tests.test_quota_usage -*-
"""Per-user quota: the limits (accounts.json or ``[accounts] default_quota``) and the usage.

Usage is the octets and messages in all of a user's folders, as the store's
indexes know them (no message is read).  Summing every folder per RCPT or
APPEND would be a scan per command, so each account's usage is cached for
L{USAGE_TTL} seconds (for the L{MAX_ACCOUNTS} accounts used last); what this
process adds (delivery, APPEND, COPY) is counted into the cache at once, and
an IMAP expunge forgets it, so space a user makes is usable at once.  Other
programs' changes show after at most L{USAGE_TTL} seconds.

The checks, as Dovecot's quota plugin and its quota-status service for Postfix:

* SMTP RCPT (L{checkRecipient}): a user already at or over the quota gets
  ``452 4.2.2 Mailbox full`` (temporary: the sender retries while the user
  makes room); a message whose declared SIZE is larger than the whole quota
  ``552 5.2.2`` (it could never fit; RFC 5321 §4.5.3.1.10 asks clients to
  treat a 552 to RCPT as temporary too, so nothing is lost on one that does).
  A message accepted while under the quota may take the user past it, once
  (Dovecot's ``quota_grace`` does the same).
* IMAP APPEND, COPY and MULTIAPPEND (L{reserve}): refused with ``NO
  [OVERQUOTA]`` (RFC 9208 §7.1) if the new messages would go past the quota.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistmail.delivery.routing import LocalRoute

log = Logger()

#: Seconds a computed usage is trusted (what this process adds is counted at once).
USAGE_TTL = 10.0
#: Accounts whose usage is cached (least recently used forgotten first).
MAX_ACCOUNTS = 10000


@dataclass(frozen=True)
class Quota:
    """Limits; None is no limit for that resource."""

    storage: int | None = None  # octets
    messages: int | None = None

    @classmethod
    def fromDict(cls, table: dict) -> Quota:
        return cls(table.get("storage") or None, table.get("messages") or None)

    @property
    def unlimited(self) -> bool:
        return self.storage is None and self.messages is None


@dataclass(frozen=True)
class Usage:
    octets: int = 0
    messages: int = 0


class OverQuota(Exception):
    """Refused for quota; C{code} and C{text} are the SMTP reply (IMAP says OVERQUOTA)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class _Cached:
    usage: Usage
    expires: float


class QuotaTracker:
    """Limits and cached usage for every account of one store."""

    def __init__(self, store, accounts, default: Quota,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._accounts = accounts
        self.default = default
        self._clock = clock
        self._cache: collections.OrderedDict[str, _Cached] = collections.OrderedDict()
        self._computing: dict[str, list] = {}  # account -> its waiters, while computing

    @classmethod
    def fromConfig(cls, config, store, accounts) -> QuotaTracker:
        table = config["accounts"]
        return cls(store, accounts, Quota(table["default_quota"] or None,
                                          table["default_quota_messages"] or None))

    def limits(self, account: str) -> Quota:
        own = self._accounts.quota(account)
        return self.default if own is None else Quota.fromDict(own)

    async def usage(self, account: str) -> Usage:
        account = account.lower()
        cached = self._cache.get(account)
        if cached is not None and cached.expires > self._clock():
            self._cache.move_to_end(account)
            return cached.usage
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._computing.get(account)
        if waiters is None:
            # One computation per account however many ask meanwhile.
            waiters = self._computing[account] = [waiter]
            defer.Deferred.fromCoroutine(self._compute(account)).addBoth(self._computed, account)
        else:
            waiters.append(waiter)
        return await waiter

    def _computed(self, result, account: str) -> None:
        waiters = self._computing.pop(account, [])
        if isinstance(result, Usage):
            self._remember(account, result)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _compute(self, account: str) -> Usage:
        mailAccount = self._store.account(account)
        octets = messages = 0
        for name in await mailAccount.listFolders():
            mailbox = await mailAccount.openFolder(name)
            for message in mailbox.messages():
                octets += message.size
                messages += 1
        return Usage(octets, messages)

    def _remember(self, account: str, usage: Usage) -> None:
        self._cache[account] = _Cached(usage, self._clock() + USAGE_TTL)
        self._cache.move_to_end(account)
        while len(self._cache) > MAX_ACCOUNTS:
            self._cache.popitem(last=False)

    def added(self, account: str, octets: int, messages: int) -> None:
        """This process stored messages for C{account}: count them now."""
        cached = self._cache.get(account.lower())
        if cached is not None:
            cached.usage = Usage(cached.usage.octets + octets, cached.usage.messages + messages)

    def forget(self, account: str) -> None:
        """Messages went (expunge, delete): the next question recomputes."""
        self._cache.pop(account.lower(), None)

    async def reserve(self, account: str, octets: int, messages: int) -> None:
        """IMAP: raise L{OverQuota} unless C{messages} more, C{octets} in all, fit; if
        they do, count them now, so concurrent sessions cannot all take the last room.
        (If storing them fails, the caller calls L{forget}.)"""
        quota = self.limits(account)
        if quota.unlimited:
            return
        used = await self.usage(account)
        # Other sessions' reservations made while this one waited are in the cache.
        cached = self._cache.get(account.lower())
        if cached is not None:
            used = cached.usage
        if (quota.storage is not None and used.octets + octets > quota.storage) or (
                quota.messages is not None and used.messages + messages > quota.messages):
            raise OverQuota(452, "4.2.2 Mailbox full")
        self.added(account, octets, messages)

    async def checkRecipient(self, accounts, size: int | None) -> None:
        """SMTP RCPT: raise L{OverQuota} if C{accounts} (where the recipient goes: one
        user, or an alias's users) are all full, or C{size} (MAIL SIZE=, if given) is
        more than the whole quota of each.  An alias with one user who can take the
        message is accepted: the others' mail is not held back by one full mailbox."""
        refusal = None
        for account in accounts:
            quota = self.limits(account)
            if quota.unlimited:
                return
            if size is not None and quota.storage is not None and size > quota.storage:
                refusal = refusal or OverQuota(
                    552, "5.2.2 Message is larger than the recipient's whole quota")
                continue
            used = await self.usage(account)
            if (quota.storage is not None and used.octets >= quota.storage) or (
                    quota.messages is not None and used.messages >= quota.messages):
                refusal = OverQuota(452, "4.2.2 Mailbox full")
                continue
            return
        if refusal is not None:
            raise refusal


def checkRcpt(quota: QuotaTracker | None, route, size: int | None) -> defer.Deferred:
    """The SMTP RCPT path's quota step: fires with None, or fails with L{OverQuota}.

    Only mail for local accounts counts; a usage that cannot be computed (a
    storage error) lets the recipient through: delivery reports that error."""
    if quota is None or not isinstance(route, LocalRoute):
        return defer.succeed(None)

    def unknown(failure: Failure) -> None:
        if failure.check(OverQuota):
            return failure
        log.failure("quota usage of {accounts} unknown; recipient accepted", failure,
                    accounts=",".join(route.accounts))
        return None

    return defer.Deferred.fromCoroutine(quota.checkRecipient(route.accounts, size)).addErrback(unknown)


def kib(octets: int) -> int:
    """RFC 9208 §5.1: STORAGE is in units of 1024 octets (usage rounded up)."""
    return math.ceil(octets / 1024)
