# -*- test-case-name: tests.test_tlsrpt -*-
"""TLS-RPT (RFC 8460): counts of verified-TLS sessions per policy domain and day.

``RelaySender`` calls ``record`` after each attempt under an MTA-STS policy;
``flush`` writes one RFC 8460 §4 JSON report per domain and day into the
directory given (atomically; call it off the reactor thread).  The table is
bounded: past ``MAX_DOMAINS`` domains a day, new domains are not counted.
"""

from __future__ import annotations

import json
import os
import re
import time

from twistmail._fsutil import atomicWrite

#: Policy domains counted per day; more are dropped (hostile DNS cannot grow memory).
MAX_DOMAINS = 10000
#: Distinct failure details kept per domain.
MAX_DETAILS = 100
#: A domain name safe to use in a file name (no "/", no leading dot).
_DOMAIN = re.compile(r"^[a-z0-9-]+(?:\.[a-z0-9-]+)*$")


class TLSReports:
    """Accumulates RFC 8460 counts in memory until ``flush``."""

    def __init__(self, organization: str, now=time.time) -> None:
        self._organization = organization
        self._now = now
        self._days: dict[tuple[str, str], dict] = {}

    def record(self, domain: str, policy, failure: str | None, host: str, address: str) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime(self._now()))
        key = (day, domain.lower())
        if not _DOMAIN.match(key[1]):
            return  # not a name we would deliver to; never a path
        entry = self._days.get(key)
        if entry is None:
            if len(self._days) >= MAX_DOMAINS:
                return
            entry = self._days[key] = {"policy": policy, "ok": 0, "failed": 0, "details": {}}
        if failure is None:
            entry["ok"] += 1
            return
        entry["failed"] += 1
        detail = (failure, host, address)
        if detail in entry["details"] or len(entry["details"]) < MAX_DETAILS:
            entry["details"][detail] = entry["details"].get(detail, 0) + 1

    def report(self, day: str, domain: str) -> dict:
        """The RFC 8460 §4.4 JSON object for one day and domain."""
        entry = self._days[(day, domain)]
        policy = entry["policy"]
        return {
            "organization-name": self._organization,
            "date-range": {"start-datetime": f"{day}T00:00:00Z",
                           "end-datetime": f"{day}T23:59:59Z"},
            "report-id": f"{day}_{domain}@{self._organization}",
            "policies": [{
                "policy": {"policy-type": "sts", "policy-domain": domain,
                           "policy-string": ["version: STSv1", f"mode: {policy.mode}"]
                           + [f"mx: {mx}" for mx in policy.mx] + [f"max_age: {policy.maxAge}"]},
                "summary": {"total-successful-session-count": entry["ok"],
                            "total-failure-session-count": entry["failed"]},
                "failure-details": [  # RFC 8460 §4.3 result types
                    {"result-type": kind, "receiving-mx-hostname": host, "receiving-ip": address,
                     "failed-session-count": n}
                    for (kind, host, address), n in entry["details"].items()],
            }],
        }

    def flush(self, directory: str) -> list[str]:
        """Write every report (the current day's too, rewritten later); forget past days."""
        os.makedirs(directory, exist_ok=True)
        today = time.strftime("%Y-%m-%d", time.gmtime(self._now()))
        written = []
        for day, domain in list(self._days):
            path = os.path.join(directory, f"{day}_{domain}.json")
            atomicWrite(path, json.dumps(self.report(day, domain), indent=1).encode())
            written.append(path)
            if day != today:
                del self._days[(day, domain)]
        return written
