# -*- test-case-name: tests.test_verify_filter -*-
"""The Authentication-Results header field (RFC 8601) that records what we verified.

Every value in it comes from a client or from DNS (domains in a DKIM
signature, a From header, a reason), so each is written as an RFC 2045 token
when it is one and as an escaped quoted-string otherwise: a hostile ``d=``
cannot end a result with ``;`` and forge another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME = "Authentication-Results"

#: RFC 2045 §5.1 token: printable ASCII but space and tspecials.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
#: RFC 8601 §2.2 pvalue: also [local-part "@"] domain-name, for smtp.mailfrom.
_ADDRESS = re.compile(r"[!#$%&'*+\-/=?^_`{|}~.0-9A-Za-z]+@[-.0-9A-Za-z]+")
#: Longest reason or property value written; hostile input can be longer.
MAX_VALUE = 200


@dataclass(frozen=True)
class Result:
    """One resinfo (RFC 8601 §2.2): ``method=result [reason="..."] (comment) ptype.prop=value...``."""

    method: str
    result: str
    props: tuple = ()  # (name, value) pairs, e.g. ("header.d", "example.com")
    reason: str = ""
    comment: str = ""


def pvalue(value: str) -> str:
    """C{value} as a token or an address when it is one, else as a quoted-string."""
    if _TOKEN.fullmatch(value) or _ADDRESS.fullmatch(value):
        return value[:MAX_VALUE]
    return quoted(value)


def quoted(value: str) -> str:
    """An RFC 5322 §3.2.4 quoted-string: control and non-ASCII characters become "?"."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in value[:MAX_VALUE])
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    cleaned = "".join(c if " " <= c <= "~" and c not in "()\\" else "?" for c in text[:MAX_VALUE])
    return f"({cleaned})"


def _resinfo(r: Result) -> str:
    words = [f"{r.method}={r.result}"]
    if r.reason:
        words.append(f"reason={quoted(r.reason)}")
    if r.comment:
        words.append(_comment(r.comment))
    words += [f"{name}={pvalue(value)}" for name, value in r.props if value]
    return " ".join(words)


def header(authservId: str, results: list[Result]) -> tuple[str, str]:
    """(name, value) of one Authentication-Results field, one result a line.

    RFC 8601 §2.2: ``authserv-id; resinfo; resinfo``; with no result, ``none``.
    Lines are folded with CRLF and a tab (RFC 5322 §2.2.3), as Received is.
    """
    if not results:
        return NAME, f"{authservId}; none"
    return NAME, ";\r\n\t".join([authservId] + [_resinfo(r) for r in results])
