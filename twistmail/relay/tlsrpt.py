# -*- test-case-name: tests.test_tlsrpt -*-
"""TLS-RPT (RFC 8460): counts of verified-TLS sessions per policy domain and day.

``RelaySender`` calls ``record`` after each attempt under an MTA-STS policy.
``snapshot`` (on the reactor thread) copies out one RFC 8460 §4 JSON report
per domain and day and forgets finished days; ``writeReports`` (off it)
writes them atomically as ``<day>_<domain>.json``; ``merge`` adds back the
counts a previous run wrote for today, so a restart does not lose them.  The
table is bounded: past ``MAX_DOMAINS`` domains a day, new domains are not
counted.

``parseRecord`` and ``mailtoAddresses`` read a domain's ``_smtp._tls`` TXT
record (RFC 8460 §3), strictly and with bounds: it comes from anyone's DNS.
"""

from __future__ import annotations

import json
import os
import re
import time
from urllib.parse import unquote

from twistmail._fsutil import atomicWrite
from twistmail.mtasts import Policy

#: Policy domains counted per day; more are dropped (hostile DNS cannot grow memory).
MAX_DOMAINS = 10000
#: Distinct failure details kept per domain.
MAX_DETAILS = 100
#: A domain name safe to use in a file name (no "/", no leading dot).
_NAME = r"[a-z0-9-]+(?:\.[a-z0-9-]+)*"
_DOMAIN = re.compile(rf"^{_NAME}$")
#: A report file: ``<day>_<domain>.json``.
REPORT_FILE = re.compile(rf"^(\d{{4}}-\d{{2}}-\d{{2}})_({_NAME})\.json$")

#: The longest TXT record read, joined (a 1,000-URI record is refused, not parsed).
MAX_RECORD = 2048
#: Report addresses of one domain that get the report; the rest are ignored.
MAX_RUA = 5
# RFC 8460 §3: tlsrpt-record = tlsrpt-version 1*(field-delim tlsrpt-field) [field-delim]
_VERSION = re.compile(r"^v=TLSRPTv1[ \t]*;")
_EXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_EXT_VALUE = re.compile(r"^[\x21-\x3a\x3c\x3e-\x7e]+$")  # no "=", ";", SP or controls
# RFC 3986 URI: a scheme, then URI characters ("," and "!" must be %-encoded, §3).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9\-._~:/?#\[\]@$&'()*+;=%]+$")
# RFC 5321 §4.1.2: a dot-atom local part (no quoted strings) and a host name.
_MAILBOX = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                      r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+$")


class RecordError(ValueError):
    """A ``_smtp._tls`` TXT record set that is not one valid TLSRPTv1 record."""


def parseRecord(texts: list[str]) -> list[str] | None:
    """The ``rua`` URIs of a domain's TLS-RPT record; None when it publishes none.

    @param texts: each TXT record, its strings already joined.
    @raise RecordError: several TLSRPTv1 records, or one that is malformed or too long.
    """
    # RFC 8460 §3: records not starting "v=TLSRPTv1;" are discarded; other than one left
    # means TLS-RPT is not implemented (several are an error, reported as such).
    records = [t for t in texts if _VERSION.match(t)]
    if not records:
        return None
    if len(records) > 1:
        raise RecordError("more than one v=TLSRPTv1 TXT record")
    [record] = records
    if len(record) > MAX_RECORD:
        raise RecordError(f"the record is longer than {MAX_RECORD} characters")
    rua = None
    fields = [field.strip(" \t") for field in record.split(";")[1:]]
    if fields and not fields[-1]:
        fields.pop()  # RFC 8460 §3: an optional field-delim at the end
    for field in fields:
        name, eq, value = field.partition("=")
        if name == "rua" and eq:
            if rua is not None:
                raise RecordError("rua given twice")
            # tlsrpt-rua = %s"rua=" tlsrpt-uri *(*WSP "," *WSP tlsrpt-uri)
            rua = [uri.strip(" \t") for uri in value.split(",")]
            if not all(_URI.match(uri) for uri in rua):
                raise RecordError("rua is not a list of URIs")
        elif not (eq and _EXT_NAME.match(name) and _EXT_VALUE.match(value)):
            raise RecordError("a field that is not name=value")  # extensions are ignored
    if rua is None:
        raise RecordError("no rua field")
    return rua


def mailtoAddresses(uris: list[str]) -> list[str]:
    """The first L{MAX_RUA} report addresses among C{uris}' ``mailto:`` URIs.

    Only a plain address is used: a ``?`` part (RFC 6068 header fields) is dropped,
    and anything that is not one dot-atom address (several, quoted, bracketed) is skipped.
    """
    found = []
    for uri in uris:
        scheme, _, rest = uri.partition(":")
        if scheme.lower() != "mailto":
            continue
        address = unquote(rest.partition("?")[0])
        if _MAILBOX.match(address) and len(address) <= 254:
            local, _, domain = address.rpartition("@")
            found.append(f"{local}@{domain.lower()}")
            if len(found) == MAX_RUA:
                break
    return found


class TLSReports:
    """Accumulates RFC 8460 counts in memory until ``flush``."""

    def __init__(self, organization: str, now=time.time) -> None:
        self._organization = organization
        self._now = now
        self._days: dict[tuple[str, str], dict] = {}

    def today(self) -> str:
        """The current UTC day, as reports name it."""
        return time.strftime("%Y-%m-%d", time.gmtime(self._now()))

    def record(self, domain: str, policy, failure: str | None, host: str, address: str) -> None:
        key = (self.today(), domain.lower())
        if not _DOMAIN.match(key[1]):
            return  # not a name we would deliver to; never a path
        entry = self._days.get(key)
        if entry is None:
            if len(self._days) >= MAX_DOMAINS:
                return
            entry = self._days[key] = {"policy": policy, "ok": 0, "failed": 0, "details": {}}
        entry["dirty"] = True
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

    def snapshot(self) -> list[tuple[str, dict]]:
        """The reports changed since the last snapshot, today's too, as (file name, JSON
        object); finished days are forgotten."""
        today = self.today()
        out = []
        for (day, domain), entry in list(self._days.items()):
            if entry.pop("dirty", False):
                out.append((f"{day}_{domain}.json", self.report(day, domain)))
            if day != today:
                del self._days[(day, domain)]
        return out

    def merge(self, report: dict) -> None:
        """Add the counts of a report written earlier (by a previous run) to today's table.

        @raise ValueError, KeyError, TypeError: not a report this module wrote.
        """
        day = report["date-range"]["start-datetime"][:10]
        [policy] = report["policies"]
        domain = policy["policy"]["policy-domain"]
        if not _DOMAIN.match(domain):
            raise ValueError(f"{domain!r} is not a domain name")
        lines = [line.split(": ", 1) for line in policy["policy"]["policy-string"]]
        fields = {key: value for key, value in lines if key != "mx"}
        mx = tuple(value for key, value in lines if key == "mx")
        entry = self._days.get((day, domain))
        if entry is None:
            if len(self._days) >= MAX_DOMAINS:
                return
            entry = self._days[(day, domain)] = {
                "policy": Policy(fields["mode"], mx, int(fields["max_age"])),
                "ok": 0, "failed": 0, "details": {}}
        entry["dirty"] = True
        entry["ok"] += policy["summary"]["total-successful-session-count"]
        entry["failed"] += policy["summary"]["total-failure-session-count"]
        for d in policy.get("failure-details", []):
            detail = (d["result-type"], d["receiving-mx-hostname"], d["receiving-ip"])
            if detail in entry["details"] or len(entry["details"]) < MAX_DETAILS:
                entry["details"][detail] = entry["details"].get(detail, 0) + \
                    d["failed-session-count"]

    def flush(self, directory: str) -> list[str]:
        """Write every report now (blocking: for tests and tools, not the reactor thread)."""
        return writeReports(directory, self.snapshot())


def writeReports(directory: str, reports: list[tuple[str, dict]]) -> list[str]:
    """Write C{reports} from L{TLSReports.snapshot} atomically; their paths.  Blocks."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    written = []
    for name, report in reports:
        path = os.path.join(directory, name)
        atomicWrite(path, json.dumps(report, indent=1).encode())
        written.append(path)
    return written


def readReports(directory: str, day: str) -> list[dict]:
    """The reports for C{day} written in C{directory}; unreadable ones are skipped.  Blocks."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        match = REPORT_FILE.match(name)
        if match and match.group(1) == day:
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
    return out
