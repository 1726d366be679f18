# -*- test-case-name: tests.test_hostile_verify -*-
"""DNS lookups for one message's checks, through the shared resolver, within a time limit.

The resolver bounds each query (``[relay] dns_timeout``); this bounds the
message: once its time is spent, every further lookup fails at once as a
temporary DNS failure, so a check built on hostile records or a DNS server
that never answers ends with ``temperror`` instead of holding a worker
thread lookup after lookup.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twistmail.relay.mx import DNSFailure, NotCached


class Lookups:
    """C{lookups(name, rdtype)}: the resolver's C{resolveSync}, until the deadline."""

    def __init__(self, resolveSync: Callable[[str, str], list], seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._resolve = resolveSync
        self._clock = clock
        self._deadline = clock() + seconds

    def __call__(self, name: str, rdtype: str) -> list:
        """dnspython rdata ([] for NODATA); L{DNSFailure} (temporary once time is up)."""
        if self._clock() >= self._deadline:
            raise DNSFailure(True, "4.4.3", f"time limit for this message's DNS lookups "
                             f"reached before {name} {rdtype}")
        return self._resolve(name, rdtype)

    def records(self, name: str, rdtype: str) -> list:
        """As calling it, but NXDOMAIN is no records (the checks treat both alike)."""
        try:
            return self(name, rdtype)
        except DNSFailure as e:
            if e.temporary:
                raise
            return []


class CachedLookups(Lookups):
    """Lookups answered from the resolver's kept answers alone (C{resolveCached}),
    for a check run on the reactor thread, where no lookup may wait on the network.

    A lookup the cache cannot answer fails as a temporary DNS failure, which
    the checks turn into ``temperror``, and sets C{missed}: the caller then
    discards that result and runs the check again in the DNS pool.  C{expires}
    is when the first of the answers given expires: a result made of them
    holds until then.
    """

    missed = False
    expires = float("inf")

    def __call__(self, name: str, rdtype: str) -> list:
        try:
            records, expires = self._resolve(name, rdtype)
        except NotCached:
            self.missed = True
            raise DNSFailure(True, "4.4.3", f"{name} {rdtype} not cached") from None
        except DNSFailure as e:  # a kept NXDOMAIN
            self.expires = min(self.expires, getattr(e, "expires", 0.0))
            raise
        self.expires = min(self.expires, expires)
        return records
