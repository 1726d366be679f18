# -*- test-case-name: tests.test_antispam_greylist -*-
"""The ``greylist`` filter (RFC 6647): a first delivery attempt from an unknown source is
told to come back later; a real MTA retries, most spam software does not.

As postgrey, the defaults of which it keeps (``[antispam]``):

* the key is the triplet client network (/24 for IPv4, /64 for IPv6: a sending
  farm retries from another address), envelope sender and recipient,
  compared without case;
* the answer is ``450 4.2.0`` at RCPT TO, so the recipients a client may
  deliver to still get their own reply (RFC 6647 §2.1 allows either RCPT or
  DATA; postgrey answers at RCPT, through Postfix's check_policy_service);
* a retry ``greylist_delay`` (300 s) or more after the first attempt passes;
  a first retry later than ``greylist_retry_window`` (2 days) starts over;
* a passed triplet is remembered ``greylist_max_age`` (35 days) since it was
  last seen; a client network that passed ``greylist_auto_allow`` (5)
  triplets is no longer greylisted for as long (RFC 6647 §4.2, "automatic
  allow-listing").

Authenticated sessions, ``[relay] trusted_networks`` and ``[antispam] allow``
are never greylisted.  The tables are bounded (L{MAX_TRIPLETS},
L{MAX_CLIENTS}; least recently seen forgotten first), hold SHA-256 digests
rather than addresses (postgrey's --privacy), and are written to
``<data_dir>/state/greylist.json`` in batches, off the reactor thread, so a
restart does not greylist every correspondent anew.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet import threads
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from twistmail._logtext import loggable
from twistmail._netaddr import parseHost
from twistmail._statepublisher import StatePublisher
from twistmail.filters.allowlist import AllowList, noOwnOptions
from twistmail.filters.base import Filter
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import Verdict

log = Logger()

#: Triplets and client networks remembered at most (about 150 and 100 bytes each).
MAX_TRIPLETS = 200_000
MAX_CLIENTS = 50_000
#: Seconds between writes of the state file (only when something changed).
SAVE_INTERVAL = 60
FORMAT_VERSION = 1
#: postgrey's --ipv4cidr and --ipv6cidr defaults.
IPV4_PREFIX, IPV6_PREFIX = 24, 64


def statePath(dataDir: str) -> str:
    return os.path.join(dataDir, "state", "greylist.json")


def network(client: str) -> str | None:
    """The client's /24 or /64, as text; None if C{client} is not an address."""
    address = parseHost(client)
    if address is None:
        return None
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _digest(net: str, sender: str, recipient: str) -> str:
    triplet = "\0".join((net, sender.lower(), recipient.lower()))
    return hashlib.sha256(triplet.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class Greylist:
    """The triplet and client tables; everything runs on the reactor thread."""

    def __init__(self, delay: int, retryWindow: int, maxAge: int, autoAllow: int,
                 clock: Callable[[], float], maxTriplets: int = MAX_TRIPLETS,
                 maxClients: int = MAX_CLIENTS) -> None:
        self.delay, self.retryWindow, self.maxAge, self.autoAllow = (
            delay, retryWindow, maxAge, autoAllow)
        self._clock = clock
        self._max = {"triplets": maxTriplets, "clients": maxClients}
        #: digest -> (first seen, last seen, passed)
        self._triplets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()
        #: network -> (triplets passed, last seen)
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.changed = False

    def __len__(self) -> int:
        return len(self._triplets)

    def _put(self, table: OrderedDict, key: str, value: tuple, limit: int) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > limit:
            table.popitem(last=False)
        self.changed = True

    def _fresh(self, triplet: tuple[float, float, bool], now: float) -> bool:
        first, last, passed = triplet
        return now - last <= self.maxAge if passed else now - first <= self.retryWindow

    def check(self, client: str, sender: str, recipient: str) -> int:
        """Seconds the client has yet to wait; 0 if this RCPT passes."""
        net = network(client)
        if net is None:
            return 0
        now = self._clock()
        passes, seen = self._clients.get(net, (0, -math.inf))
        if self.autoAllow and passes >= self.autoAllow and now - seen <= self.maxAge:
            self._put(self._clients, net, (passes, now), self._max["clients"])
            return 0
        key = _digest(net, sender, recipient)
        triplet = self._triplets.get(key)
        if triplet is None or not self._fresh(triplet, now):
            self._put(self._triplets, key, (now, now, False), self._max["triplets"])
            return self.delay
        first, _, passed = triplet
        wait = 0 if passed else math.ceil(first + self.delay - now)
        if wait > 0:
            self._put(self._triplets, key, (first, now, False), self._max["triplets"])
            return wait
        self._put(self._triplets, key, (first, now, True), self._max["triplets"])
        if not passed:  # RFC 6647 §4.2: count the retries that passed
            self._put(self._clients, net, (passes + 1, now), self._max["clients"])
        return 0

    # -- PublishedState (twistmail._statepublisher) ------------------------------

    def capture(self) -> Callable[[], dict]:
        """Copy both tables (their values are tuples: a shallow copy is a snapshot)."""
        triplets, clients = dict(self._triplets), dict(self._clients)
        now = self._clock()
        self.changed = False

        def build() -> dict:
            return {"version": FORMAT_VERSION, "saved": now,
                    "triplets": {k: [first, last, passed]
                                 for k, (first, last, passed) in triplets.items()
                                 if self._fresh((first, last, passed), now)},
                    "clients": {k: [passes, seen] for k, (passes, seen) in clients.items()
                                if now - seen <= self.maxAge}}

        return build

    def recapture(self) -> None:
        self.changed = True

    def restore(self, data: dict) -> None:
        """Take back an earlier run's tables; malformed or expired entries are skipped."""
        now = self._clock()
        triplets = [(k, v) for k, v in data.get("triplets", {}).items()
                    if isinstance(k, str) and isinstance(v, list) and len(v) == 3
                    and all(isinstance(x, (int, float)) for x in v[:2])
                    and isinstance(v[2], bool) and self._fresh(tuple(v), now)]
        for key, (first, last, passed) in sorted(triplets, key=lambda kv: kv[1][1]):
            self._put(self._triplets, key, (first, last, passed), self._max["triplets"])
        clients = [(k, v) for k, v in data.get("clients", {}).items()
                   if isinstance(k, str) and isinstance(v, list) and len(v) == 2
                   and isinstance(v[0], int) and isinstance(v[1], (int, float))
                   and now - v[1] <= self.maxAge]
        for key, (passes, seen) in sorted(clients, key=lambda kv: kv[1][1]):
            self._put(self._clients, key, (passes, seen), self._max["clients"])
        self.changed = False


def readState(path: str) -> dict:
    """The state file's content; C{{}} when there is none yet.

    @raise ValueError: it is not a greylist state file this version can read.
    """
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not all(
            isinstance(data.get(key, {}), dict) for key in ("triplets", "clients")):
        raise ValueError(f"not a version {FORMAT_VERSION} greylist state file")
    return data


class GreylistFilter(Filter):
    """Tempfails the RCPT of a triplet not seen (or not retried long enough) before."""

    name = "greylist"

    def __init__(self, table: Greylist | None, allow: AllowList,
                 publisher: StatePublisher | None = None) -> None:
        self.table = table
        self.allow = allow
        #: writes the table to disk; started and stopped with the reactor
        self.publisher = publisher

    def rcptTo(self, session, recipient: str):
        if self.table is None or self.allow.session(session, recipient):
            return None
        sender = session.sender or ""
        wait = self.table.check(session.client, sender, recipient)
        if not wait:
            return None
        log.info("greylist client={client} from={sender} to={recipient} result=greylisted "
                 "wait={wait}", client=loggable(session.client), sender=loggable(sender),
                 recipient=loggable(recipient), wait=wait)
        # RFC 6647 §2.1: a temporary failure; the 4.2.0 Postfix gives postgrey's answer.
        return Verdict.tempfail(f"4.2.0 Greylisted, try again in {wait} seconds", 450)


@implementer(IPlugin, IMessageFilterFactory)
class GreylistFilterFactory:
    name = "greylist"
    description = "greylisting (RFC 6647) when [antispam] greylist = true: 450 4.2.0 at RCPT"

    def makeFilter(self, options: dict, context) -> GreylistFilter:
        noOwnOptions(self.name, options)
        settings = context.config["antispam"]
        allow = AllowList.fromConfig(context.config)
        if not settings["greylist"]:
            return GreylistFilter(None, allow)
        table = Greylist(settings["greylist_delay"], settings["greylist_retry_window"],
                         settings["greylist_max_age"], settings["greylist_auto_allow"],
                         context.reactor.seconds)
        publisher = StatePublisher(table, statePath(context.dataDir), readState, context.reactor,
                                   threads.deferToThread, SAVE_INTERVAL, "greylist")
        reactor = context.reactor
        if IReactorCore.providedBy(reactor):
            # The filter has no service of its own: the table is read when the reactor
            # starts and written before it stops.
            reactor.callWhenRunning(publisher.startService)
            reactor.addSystemEventTrigger("before", "shutdown", publisher.stopService)
        return GreylistFilter(table, allow, publisher)
