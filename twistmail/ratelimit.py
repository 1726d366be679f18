# -*- test-case-name: tests.test_ratelimit -*-
"""Outbound rate limits per authenticated user and per sending domain.

A stolen password is used to send spam as fast as the server lets it.  Each
message an authenticated user sends, and each recipient, is counted against the
user and against the domain of the account (``[submission]``
``max_messages_per_hour``, ``max_recipients_per_hour`` and their ``domain_``
twins; 0 = unlimited).

* **Sliding window**: per-minute buckets over the last hour, so a limit never
  resets all at once at the top of the hour (as policyd-rate-limit's sliding
  window).  Should the clock step back, counts stamped up to an hour ahead
  still count: a clock change never hands out a fresh hour.
* **Reserve, then commit or release**: MAIL reserves one message and each
  accepted RCPT one recipient, before the 250; the end of DATA commits them, and
  RSET, a failed DATA or a lost connection gives them back.  Reservations count
  against the limit at once, so concurrent sessions of one account cannot
  overshoot it together (counting at the final 250 would let each of them pass).
  All of this runs on the reactor thread: no locks.
* **Bounded**: at most L{MAX_TRACKED} users and as many domains, about 1.5 KiB
  each (a ring of 60 slots), so about 30 MB when both tables are full; the least
  recently active are forgotten first.
* **Published** (L{RateLimitPublisher}): the counts are written to
  ``<data_dir>/state/ratelimits.json`` every L{SAVE_INTERVAL} seconds when they
  changed, and at stop, off the reactor thread, atomically; and read back at start,
  so a restart does not reset the window.  The CLI reads the same file.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from twistmail._statepublisher import StatePublisher

#: The window, and the width of one bucket in it, in seconds.
WINDOW = 3600
BUCKET = 60
SLOTS = WINDOW // BUCKET
_MAX_COUNT = 2**32 - 1  # an "I" array slot
_NEVER = -2**62  # the minute of a slot never used
#: Users, and domains, tracked at most (least recently active forgotten first).
MAX_TRACKED = 10_000
#: Seconds between writes of the state file (only when something changed).
SAVE_INTERVAL = 10
FORMAT_VERSION = 1
SCOPES = {"user": "users", "domain": "domains"}  # scope -> its table in the state file


def statePath(dataDir: str) -> str:
    return os.path.join(dataDir, "state", "ratelimits.json")


@dataclass(frozen=True)
class Limits:
    """Per hour; 0 = unlimited."""

    messages: int
    recipients: int

    @classmethod
    def fromConfig(cls, submission, scope: str) -> Limits:
        """The user's (C{scope} "user") or the domain's limits from C{[submission]}."""
        prefix = "domain_" if scope == "domain" else ""
        return cls(submission[f"{prefix}max_messages_per_hour"],
                   submission[f"{prefix}max_recipients_per_hour"])


class LimitReached(Exception):
    """One of the hourly limits would be passed: the command is deferred (451 4.7.1)."""

    def __init__(self, scope: str, name: str, what: str, limit: int) -> None:
        super().__init__(scope, name, what, limit)
        self.scope, self.name, self.what, self.limit = scope, name, what, limit

    @property
    def key(self) -> str:
        """The config key of the limit, as logged."""
        return f"{'domain_' if self.scope == 'domain' else ''}max_{self.what}_per_hour"

    def reply(self) -> str:
        # RFC 3463 §3.8 X.7.1: delivery not authorized (a policy decision), here temporary.
        return (f"4.7.1 Rate limit reached: {self.scope} {self.name} may send {self.limit} "
                f"{self.what} per hour; try again later")


class StateError(ValueError):
    """The state file cannot be read: named with its path and what to do."""


class _Window:
    """One user's or domain's recent sending, and what open transactions reserved.

    A ring of one slot per minute of the window (the minute it holds, its messages,
    its recipients), in arrays: about 1 KiB however busy the sender."""

    __slots__ = ("minutes", "sentMessages", "sentRecipients", "messages", "recipients")

    def __init__(self) -> None:
        self.minutes = array("q", [_NEVER]) * SLOTS
        self.sentMessages = array("I", [0]) * SLOTS
        self.sentRecipients = array("I", [0]) * SLOTS
        self.messages = 0  # reserved, not yet committed
        self.recipients = 0

    def copy(self) -> tuple[array, array, array]:
        """The counts alone, copied at C speed (for L{_buckets} in a thread)."""
        return self.minutes[:], self.sentMessages[:], self.sentRecipients[:]

    def sent(self, minute: int) -> tuple[int, int]:
        """Messages and recipients committed in the window ending with C{minute}."""
        messages = recipients = 0
        for i, m in enumerate(self.minutes):
            if _recent(m, minute):
                messages += self.sentMessages[i]
                recipients += self.sentRecipients[i]
        return messages, recipients

    def add(self, minute: int, messages: int, recipients: int) -> None:
        slot = minute % SLOTS
        if self.minutes[slot] != minute:  # an hour (or more) away, or never: reuse the slot
            self.minutes[slot] = minute
            self.sentMessages[slot] = self.sentRecipients[slot] = 0
        self.sentMessages[slot] = min(self.sentMessages[slot] + messages, _MAX_COUNT)
        self.sentRecipients[slot] = min(self.sentRecipients[slot] + recipients, _MAX_COUNT)


def _recent(stamp: int, minute: int) -> bool:
    """Whether a bucket of C{stamp} is in the window ending with C{minute} (or ahead of
    it by less than the window: the clock stepped back)."""
    return minute - SLOTS < stamp < minute + SLOTS


def _buckets(counts: tuple[array, array, array], minute: int) -> list[list[int]]:
    """[minute, messages, recipients] of the window ending with C{minute}, oldest first."""
    minutes, messages, recipients = counts
    return sorted([m, messages[i], recipients[i]]
                  for i, m in enumerate(minutes) if _recent(m, minute))


def totals(buckets: Any, now: float) -> tuple[int, int]:
    """Messages and recipients in the hour before C{now}, from a state file's buckets."""
    minute = int(now // BUCKET)
    if not isinstance(buckets, list):
        return 0, 0
    recent = [b for b in buckets if _valid(b) and _recent(b[0], minute)]
    return sum(b[1] for b in recent), sum(b[2] for b in recent)


def _valid(bucket) -> bool:
    return isinstance(bucket, list) and len(bucket) == 3 and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in bucket)


class SendLimits:
    """The counts of every authenticated sender, shared by every SMTP listener."""

    def __init__(self, user: Limits, domain: Limits, clock: Callable[[], float] = time.time,
                 maxTracked: int = MAX_TRACKED) -> None:
        """@param clock: wall-clock seconds: buckets are kept across restarts."""
        self.limits = {"user": user, "domain": domain}
        self._clock = clock
        self._maxTracked = maxTracked
        self._tables: dict[str, OrderedDict[str, _Window]] = {
            "user": OrderedDict(), "domain": OrderedDict()}
        #: Names whose counts changed since the last L{capture}.
        self._dirty: dict[str, set[str]] = {scope: set() for scope in SCOPES}
        #: What the last build published, per scope: name -> buckets.  Only the
        #: (one at a time) build touches it, in the publisher's thread.
        self._published: dict[str, dict[str, list]] = {scope: {} for scope in SCOPES}

    @property
    def changed(self) -> bool:
        """Whether a count changed since the last L{capture}."""
        return any(self._dirty.values())

    def _window(self, scope: str, name: str) -> _Window:
        table = self._tables[scope]
        window = table.get(name)
        if window is None:
            window = table[name] = _Window()
            while len(table) > self._maxTracked:
                table.popitem(last=False)
        else:
            table.move_to_end(name)
        return window

    def _scopes(self, account: str) -> list[tuple[str, str, _Window]]:
        domain = account.rpartition("@")[2]
        found = [("user", account, self._window("user", account))]
        if domain:
            found.append(("domain", domain, self._window("domain", domain)))
        return found

    def _check(self, scopes, what: str) -> None:
        minute = int(self._clock() // BUCKET)
        for scope, name, window in scopes:
            limit = getattr(self.limits[scope], what)
            if not limit:
                continue
            sent = window.sent(minute)[0 if what == "messages" else 1]
            if sent + getattr(window, what) >= limit:
                raise LimitReached(scope, name, what, limit)

    def begin(self, account: str) -> Reservation:
        """Reserve one message of C{account} (at MAIL).

        @raise LimitReached: the user or the domain has no message left this hour.
        """
        scopes = self._scopes(account.lower())
        self._check(scopes, "messages")
        return Reservation(self, scopes)

    def counts(self, scope: str, name: str) -> tuple[int, int]:
        """Messages and recipients C{name} sent in the last hour (reservations apart)."""
        window = self._tables[scope].get(name)
        return window.sent(int(self._clock() // BUCKET)) if window else (0, 0)

    def capture(self) -> Callable[[], dict]:
        """Copy the counts changed since the last capture (on the reactor thread: a
        few arrays per sender who sent meanwhile).  The result builds the state
        file's content from them and from the last build, and is meant to run in
        another thread, one build at a time."""
        now = self._clock()
        minute = int(now // BUCKET)
        limits = {scope: {"messages": lim.messages, "recipients": lim.recipients}
                  for scope, lim in self.limits.items()}
        copied = {scope: [(name, self._tables[scope][name].copy()) for name in names
                          if name in self._tables[scope]]
                  for scope, names in self._dirty.items()}
        for names in self._dirty.values():
            names.clear()

        def build() -> dict:
            data: dict = {"version": FORMAT_VERSION, "saved": now, "bucket": BUCKET,
                          "window": WINDOW, "limits": limits}
            for scope, key in SCOPES.items():
                published = self._published[scope]
                published.update((name, _buckets(counts, minute)) for name, counts in copied[scope])
                for name, buckets in list(published.items()):
                    recent = [b for b in buckets if _recent(b[0], minute)]
                    if recent:
                        published[name] = recent
                    else:
                        del published[name]  # nothing in the last hour (or forgotten)
                data[key] = dict(published)
            return data

        return build

    def recapture(self) -> None:
        """The last capture was lost (its write failed): copy every sender next time."""
        for scope, names in self._dirty.items():
            names.update(self._tables[scope])

    def snapshot(self) -> dict:
        """The counts as the state file holds them."""
        return self.capture()()

    def restore(self, data: dict) -> None:
        """Take back the buckets of a snapshot (an earlier run's); malformed entries are skipped."""
        minute = int(self._clock() // BUCKET)
        for scope, key in SCOPES.items():
            table = data.get(key)
            if not isinstance(table, dict):
                continue
            for name, buckets in table.items():
                if isinstance(name, str) and isinstance(buckets, list):
                    good = [b for b in buckets if _valid(b) and _recent(b[0], minute)]
                    if good:
                        window = self._window(scope, name)
                        for when, messages, recipients in sorted(good):
                            window.add(when, messages, recipients)
                        self._dirty[scope].add(name)


class Reservation:
    """What one SMTP transaction has reserved; committed at its 250, else released."""

    def __init__(self, limits: SendLimits, scopes: list) -> None:
        self._limits = limits
        self._scopes = scopes
        self._recipients = 0
        self._open = True
        for _, _, window in scopes:
            window.messages += 1

    def addRecipient(self) -> None:
        """Reserve one more recipient (at an accepted RCPT).

        @raise LimitReached: the user or the domain has no recipient left this hour.
        """
        self._limits._check(self._scopes, "recipients")
        self._recipients += 1
        for _, _, window in self._scopes:
            window.recipients += 1

    def _close(self) -> bool:
        if not self._open:
            return False
        self._open = False
        for _, _, window in self._scopes:
            window.messages = max(0, window.messages - 1)
            window.recipients = max(0, window.recipients - self._recipients)
        return True

    def commit(self) -> None:
        """The message was accepted: it counts as sent from now."""
        if self._close():
            minute = int(self._limits._clock() // BUCKET)
            for scope, name, window in self._scopes:
                window.add(minute, 1, self._recipients)
                self._limits._dirty[scope].add(name)

    def release(self) -> None:
        """The transaction ended without a message: give back what it reserved (idempotent)."""
        self._close()


def readState(path: str) -> dict:
    """The state file's content, checked for shape; C{{}} when there is none yet.

    @raise StateError: it is not a state file this version can read.
    """
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"{path}: not a rate-limit state file ({e}). Fix: delete it; the "
                         "server writes a new one") from None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not all(
            isinstance(data.get(key, {}), dict) for key in SCOPES.values()):
        raise StateError(f"{path}: not a version {FORMAT_VERSION} rate-limit state file. "
                         "Fix: delete it; the server writes a new one")
    return data


class RateLimitPublisher(StatePublisher):
    """Reads the counts back at start; writes them every C{interval} seconds when they
    changed, and at stop, so the CLI can show them and a restart keeps them."""

    def __init__(self, limits: SendLimits, dataDir: str, clock: IReactorTime,
                 inThread: Callable[..., Deferred], interval: float = SAVE_INTERVAL) -> None:
        """@param inThread: C{deferToThread}-like: runs C{f(*args)} off the reactor thread."""
        super().__init__(limits, statePath(dataDir), readState, clock, inThread, interval,
                         "ratelimit")
        self.limits = limits
