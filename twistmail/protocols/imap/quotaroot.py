# -*- test-case-name: tests.test_quota -*-
"""QUOTA (RFC 9208) responses: one quota root, ``""``, holding all of a user's folders.

The limits and the usage come from L{twistmail.delivery.quota}; SETQUOTA is
not offered (no QUOTASET): quotas are the administrator's
(``twistmail user quota``, ``[accounts] default_quota``).
"""

from __future__ import annotations

from twistmail.delivery.quota import Quota, Usage, kib

#: The one quota root (Dovecot names its root "User quota"; any name is allowed).
ROOT = b""
#: RFC 9208 §3.1: the resources we count.
CAPABILITIES = {b"QUOTA": None, b"QUOTA=RES-STORAGE": None, b"QUOTA=RES-MESSAGE": None}


def quotaResponse(limits: Quota, usage: Usage) -> bytes:
    """``* QUOTA "" (STORAGE used limit MESSAGE used limit)``: only limited resources."""
    resources = []
    if limits.storage is not None:
        # RFC 9208 §5.1: units of 1024 octets; the limit rounded down, usage up.
        resources.append(b"STORAGE %d %d" % (kib(usage.octets), limits.storage // 1024))
    if limits.messages is not None:
        resources.append(b"MESSAGE %d %d" % (usage.messages, limits.messages))
    return b'* QUOTA "" (' + b" ".join(resources) + b")"


def rootResponses(mailbox: bytes, limits: Quota, usage: Usage | None) -> list[bytes]:
    """GETQUOTAROOT's answer (RFC 9208 §4.1.2): no root for a user without a quota."""
    if limits.unlimited:
        return [b"* QUOTAROOT " + mailbox]
    return [b"* QUOTAROOT " + mailbox + b' ""', quotaResponse(limits, usage)]
