# -*- test-case-name: tests.test_mtasts -*-
"""MTA-STS (RFC 8461) records and policies: parsing and MX matching.

Pure functions, no I/O: the relay uses them on what it fetched for a
recipient domain, and a policy file we serve ourselves can be checked with
``parsePolicy`` too.  Parsing is strict: anything the RFC does not allow
makes the policy invalid (``PolicyError``), which the sender treats as "no
policy" (RFC 8461 §3.3: a syntactically invalid policy is not applied).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twistmail._dnsname import isHostName

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MODES = (ENFORCE, TESTING, NONE)

#: RFC 8461 §3.2: max_age is at most 31557600 seconds (about one year).
MAX_AGE_LIMIT = 31557600

#: The body size we accept; RFC 8461 §3.3 suggests 64 KiB.
MAX_POLICY_BYTES = 64 * 1024

# RFC 8461 §3.1: sts-id = 1*32(ALPHA / DIGIT)
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """A TXT record or policy file that is not valid MTA-STS."""


@dataclass(frozen=True)
class Policy:
    """One domain's policy as fetched (RFC 8461 §3.2)."""

    mode: str
    mx: tuple[str, ...]
    maxAge: int
    id: str = ""  # the TXT record's id at fetch time

    def matches(self, host: str) -> bool:
        """Whether the MX host name is allowed by one of the policy's patterns."""
        return any(mxMatches(pattern, host) for pattern in self.mx)


def parseRecord(texts: list[str]) -> str | None:
    """The id of the ``_mta-sts`` TXT record set, or None when there is no STS record.

    @param texts: each TXT record, its strings already joined (RFC 8461 §3.1).
    @raise PolicyError: more than one STSv1 record, or one that is malformed.
    """
    records = [t for t in texts if t.startswith("v=STSv1")]
    if not records:
        return None
    if len(records) > 1:  # RFC 8461 §3.1: several records: treat as none published
        raise PolicyError("more than one v=STSv1 TXT record")
    fields = {}
    for part in records[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PolicyError(f"malformed field {part[:64]!r} in the TXT record")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        raise PolicyError("the TXT record does not start with v=STSv1")
    id = fields.get("id", "")
    if not _ID.match(id):
        raise PolicyError(f"the TXT record's id {id[:64]!r} is not 1-32 letters and digits")
    return id


def parsePolicy(body: bytes, id: str = "") -> Policy:
    """The policy in a ``mta-sts.txt`` body; PolicyError if it is not a valid one."""
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in re.split(r"\r?\n", text):  # RFC 8461 §3.2: CRLF, LF accepted
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line {line[:64]!r} is not key: value")
        key, value = key.strip(), value.strip(" \t")
        if key == "mx":
            if not validMX(value):
                raise PolicyError(f"mx {value[:64]!r} is not a host name or *.domain pattern")
            mx.append(value.lower())
        else:
            fields.setdefault(key, value)  # the first occurrence counts; unknown keys ignored
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"mode {mode[:32]!r} is not enforce, testing or none")
    maxAge = fields.get("max_age", "")
    if not maxAge.isdigit() or len(maxAge) > 10 or int(maxAge) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {maxAge[:32]!r} is not 0..{MAX_AGE_LIMIT}")
    if not mx and mode != NONE:
        raise PolicyError("no mx line")  # RFC 8461 §3.2: mx is required unless mode is none
    return Policy(mode, tuple(mx), int(maxAge), id)


def validMX(pattern: str) -> bool:
    """Whether C{pattern} may be an ``mx:`` line: a host name or ``*.`` and a domain."""
    # RFC 8461 §3.2: mx = ["*."] Domain (labels per RFC 5321; no trailing dot)
    return isHostName(pattern.removeprefix("*."), minLabels=2)


def mxMatches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact match, or ``*.`` standing for exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern
