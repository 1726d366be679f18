# -*- test-case-name: tests.test_throttle -*-
"""Slowing down password guessing by client address, for every protocol at once.

Dovecot's ``auth_penalty`` and fail2ban, inside the server:

* Each failed login is answered after a delay that doubles with the recent
  failures of the client's address (``failure_delay``, 2 s, then 4, 8, up to
  ``max_delay``, 15 s: Dovecot's 2^n seconds, capped at 15), and the next
  attempt from that address waits as long before its password is checked.
* An address with ``max_failures`` failures within ``failure_window`` is
  blocked for ``block_time`` (fail2ban's maxretry 5, findtime and bantime 10
  minutes): refused without checking the password, which would cost an argon2
  hash.  Loopback is slowed but never blocked (fail2ban's ignoreip).
* Failures for one account from many addresses make that account's failures
  answered later too (the same doubling), so a spread-out guessing run is
  slowed; but an account is never locked: a correct password from an address
  that has not been failing is checked and answered at once.  (Locking the
  account let anyone lock any user out.)

* The same wrong password for the same account, tried again while its first
  failure is recent, is not counted again (Dovecot's penalty checksum): a
  phone or Thunderbird still holding an old password retries it on several
  connections at once, and that is one mistake, not a guessing run; it must
  not block its owner's address.  Only 8 octets of a keyed hash (a random key
  per process) are kept, never the password.

IPv6 clients are counted per /64, the block one host is usually given.  State
is in memory and bounded: at most MAX_TRACKED addresses and as many accounts
(kept as 16-octet digests), about 80 MB when both tables are full; the least
recently seen are forgotten first.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from twisted.logger import Logger

from twistmail._logtext import loggable
from twistmail._netaddr import parseHost
from twistmail.metrics import Metrics

log = Logger()

#: Addresses, and accounts, remembered at most (least recently seen forgotten first).
MAX_TRACKED = 100_000


class Verdict(NamedTuple):
    blocked: bool  # refuse without checking the password
    delay: float  # seconds to wait before checking (or before refusing)


class _Failures:
    """Recent failure times of one address or account, and an address's block deadline."""

    __slots__ = ("times", "guesses", "blockedUntil")

    def __init__(self) -> None:
        self.times: list[float] = []  # oldest first, at most AuthThrottle._keep
        self.guesses: list[bytes] = []  # the credential digest of each time (b"" unknown)
        self.blockedUntil = 0.0


def _addressKey(client: str) -> tuple[str, bool]:
    """The key C{client} is counted under, and whether it may be blocked."""
    address = parseHost(client)
    if address is None:
        return client, False  # no IP address: a local socket
    if address.version == 6 and not address.is_loopback:
        return str(ipaddress.ip_network(f"{address}/64", strict=False)), True
    return str(address), not address.is_loopback


def _accountKey(account: str) -> bytes:
    """16 octets whatever the name's length: a client chooses it (an IMAP line holds
    64 KiB of it), and 100,000 keys of that size would be gigabytes."""
    return hashlib.blake2b(account.encode("utf-8", "surrogateescape"), digest_size=16).digest()


class AuthThrottle:
    """Recent failed logins per client address and per account, shared by every listener."""

    def __init__(self, failureDelay: float, maxDelay: float, maxFailures: int, window: float,
                 blockTime: float, clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.failureDelay = failureDelay
        self.maxDelay = max(maxDelay, failureDelay)
        self.maxFailures = maxFailures
        self.window = window
        self.blockTime = blockTime
        self._clock = clock
        # Failure times kept per key: enough to block, and to reach the longest delay.
        doublings = math.ceil(math.log2(self.maxDelay / failureDelay)) + 1 if failureDelay else 1
        self._keep = max(maxFailures, min(doublings, 64))
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()
        self._accounts: OrderedDict[bytes, _Failures] = OrderedDict()
        self._secret = os.urandom(16)
        self._blocks = (metrics or Metrics()).authBlocks

    def _penalty(self, failures: int) -> float:
        """Dovecot's auth_penalty: the delay doubles with each recent failure, up to the cap."""
        if failures <= 0:
            return 0.0
        return min(self.failureDelay * 2 ** min(failures - 1, 64), self.maxDelay)

    def _recent(self, table: OrderedDict, key: str | bytes, now: float) -> _Failures | None:
        entry = table.get(key)
        if entry is not None:
            table.move_to_end(key)
            stale = 0
            while stale < len(entry.times) and entry.times[stale] <= now - self.window:
                stale += 1
            del entry.times[:stale]
            del entry.guesses[:stale]
        return entry

    def _add(self, table: OrderedDict, key: str | bytes, now: float, guess: bytes) -> _Failures:
        entry = self._recent(table, key, now)
        if entry is None:
            entry = table[key] = _Failures()
            while len(table) > MAX_TRACKED:
                table.popitem(last=False)
        if guess and guess in entry.guesses:
            return entry  # the same wrong password again: counted once
        entry.times.append(now)
        entry.guesses.append(guess)
        del entry.times[:-self._keep]
        del entry.guesses[:-self._keep]
        return entry

    def _guess(self, account: str, secret: str | None) -> bytes:
        if secret is None:
            return b""
        return hashlib.blake2b(f"{account}\0{secret}".encode("utf-8", "surrogateescape"),
                               key=self._secret, digest_size=8).digest()

    def before(self, client: str) -> Verdict:
        """Whether a login from C{client} is refused unchecked, and how long it waits first."""
        now = self._clock()
        entry = self._recent(self._addresses, _addressKey(client)[0], now)
        if entry is None:
            return Verdict(False, 0.0)
        if entry.blockedUntil > now:
            return Verdict(True, self.maxDelay)
        return Verdict(False, self._penalty(len(entry.times)))

    def failed(self, client: str, account: str, protocol: str, secret: str | None = None) -> float:
        """Count a failed login; the seconds to wait before answering it.

        @param secret: the wrong password, so that a repeat of it is counted once;
            None when unknown (every failure counts).
        """
        now = self._clock()
        key, blockable = _addressKey(client)
        guess = self._guess(account, secret)
        address = self._add(self._addresses, key, now, guess)
        hot = self._add(self._accounts, _accountKey(account), now, guess)
        if blockable and len(address.times) >= self.maxFailures and address.blockedUntil <= now:
            address.blockedUntil = now + self.blockTime
            self._blocks.inc()
            log.warn("auth block client={client} result=blocked for {seconds}s after {n} failed "
                     "logins in {window}s (last: {protocol} user={user})",
                     client=loggable(key), seconds=math.ceil(self.blockTime), n=len(address.times),
                     window=math.ceil(self.window), protocol=protocol, user=loggable(account))
        return max(self._penalty(len(address.times)), self._penalty(len(hot.times)))

    def succeeded(self, client: str) -> None:
        """A correct password: the address's failures are forgiven (not a block in force)."""
        key = _addressKey(client)[0]
        entry = self._addresses.get(key)
        if entry is not None and entry.blockedUntil <= self._clock():
            del self._addresses[key]
