# -*- test-case-name: tests.test_throttle -*-
"""Slowing down and locking out password guessing, for every protocol at once.

Each failed login is answered only after a delay, so one connection cannot
try passwords quickly.  Too many failures from one client address, or for
one account from anywhere, lock that address or account out for a while:
further attempts fail at once without checking the password (which would
cost the server an argon2 hash each), and the lockout is logged.  A
successful login clears the address's and the account's failures.

Like fail2ban's findtime / maxretry / bantime, but inside the server and
without touching the firewall.  State is in memory and bounded.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from twisted.logger import Logger

from twistmail._logtext import loggable

log = Logger()

#: Addresses and accounts remembered at most (oldest forgotten first).
MAX_TRACKED = 100_000
#: Characters of an account name a key keeps: a client chooses the name (an IMAP
#: line holds 64 KiB of it), and 100,000 keys of that size would be gigabytes.
MAX_ACCOUNT = 320


class _Window:
    """Failure times of one key within the window, and its lockout deadline."""

    __slots__ = ("failures", "lockedUntil")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.lockedUntil = 0.0


class AuthThrottle:
    def __init__(self, maxFailures: int, window: float, lockout: float, failureDelay: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maxFailures = maxFailures
        self.window = window
        self.lockout = lockout
        self.failureDelay = failureDelay
        self._clock = clock
        self._keys: OrderedDict[str, _Window] = OrderedDict()

    def _get(self, key: str, create: bool) -> _Window | None:
        entry = self._keys.get(key)
        if entry is None and create:
            entry = self._keys[key] = _Window()
            while len(self._keys) > MAX_TRACKED:
                self._keys.popitem(last=False)
        if entry is not None:
            self._keys.move_to_end(key)
        return entry

    def lockedOut(self, client: str, account: str) -> str | None:
        """Why a login from C{client} for C{account} is refused without checking, or None."""
        now = self._clock()
        for kind, key in (("address", "ip:" + client), ("account", "user:" + account[:MAX_ACCOUNT])):
            entry = self._get(key, create=False)
            if entry is not None and entry.lockedUntil > now:
                return f"{kind} locked out for {math.ceil(entry.lockedUntil - now)} more seconds"
        return None

    def failed(self, client: str, account: str, protocol: str) -> None:
        now = self._clock()
        for kind, key in (("address", "ip:" + client), ("account", "user:" + account[:MAX_ACCOUNT])):
            entry = self._get(key, create=True)
            failures = entry.failures
            failures.append(now)
            while failures and failures[0] <= now - self.window:
                failures.popleft()
            if len(failures) >= self.maxFailures and entry.lockedUntil <= now:
                entry.lockedUntil = now + self.lockout
                failures.clear()
                log.warn("auth lockout: {kind} {key} after {n} failed logins within {window}s "
                         "(last: {protocol} user={user} client={client}); locked for {lockout}s",
                         kind=kind, key=loggable(key.split(":", 1)[1]), n=self.maxFailures,
                         window=int(self.window), protocol=protocol, user=loggable(account),
                         client=client, lockout=int(self.lockout))

    def succeeded(self, client: str, account: str) -> None:
        for key in ("ip:" + client, "user:" + account[:MAX_ACCOUNT]):
            entry = self._keys.get(key)
            if entry is not None and entry.lockedUntil <= self._clock():
                del self._keys[key]
