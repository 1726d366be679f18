# -*- test-case-name: tests.test_web -*-
"""Our own MTA-STS policy (RFC 8461 §3.2) for the domains we host, and its DNS records.

The sending side (fetching and enforcing other domains' policies) lives in
twistmail.relay; this only writes and serves ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from twistmail.web.base import ReadOnly, notFound

#: RFC 8461 §3.3: the policy host is "mta-sts." followed by the Policy Domain.
HOST_PREFIX = "mta-sts."
#: RFC 8461 §3.3: the well-known path under which the policy is served.
WELL_KNOWN = (b".well-known", b"mta-sts.txt")


def policyText(mode: str, mx: Iterable[str], maxAge: int) -> bytes:
    """The policy file: "key: value" lines ending in CRLF (RFC 8461 §3.2)."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {maxAge}"]
    return "".join(line + "\r\n" for line in lines).encode("ascii")


def policyId(text: bytes) -> str:
    """The TXT record's id (RFC 8461 §3.1: 1 to 32 alphanumerics): a digest of the policy,
    so it changes exactly when the policy does and senders fetch the new one."""
    return hashlib.sha256(text).hexdigest()[:32]


def dnsRecords(text: bytes, domains: Iterable[str], webHost: str) -> list[str]:
    """The records to publish for each hosted domain, in zone-file syntax."""
    records = []
    for domain in sorted(domains):
        records.append(f'_mta-sts.{domain}. IN TXT "v=STSv1; id={policyId(text)}"')
        records.append(f"{HOST_PREFIX}{domain}. IN CNAME {webHost.rstrip('.')}.")
    return records


def policyDomain(hostHeader: bytes | None) -> str | None:
    """``mta-sts.Example.org:443`` -> ``example.org``; None for any other Host."""
    if not hostHeader:
        return None
    try:
        host = hostHeader.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    if host.startswith("["):
        return None  # an IP literal is never mta-sts.<domain>
    host = host.rsplit(":", 1)[0] if ":" in host else host
    host = host.rstrip(".")
    if not host.startswith(HOST_PREFIX) or len(host) == len(HOST_PREFIX):
        return None
    return host[len(HOST_PREFIX):]


class PolicyResource(ReadOnly):
    """The policy, for a Host header naming mta-sts.<one of our domains>; 404 otherwise."""

    def __init__(self, text: bytes, hosted: Callable[[str], bool]) -> None:
        super().__init__()
        self.text = text
        self.hosted = hosted

    def render_GET(self, request) -> bytes:
        domain = policyDomain(request.getHeader(b"host"))
        if request.postpath or domain is None or not self.hosted(domain):
            return notFound(request)
        request.setHeader(b"content-type", b"text/plain")  # RFC 8461 §3.3
        return self.text
