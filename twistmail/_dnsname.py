"""Host and domain names as DNS carries them: one rule for every place that checks one."""

from __future__ import annotations

import re

#: RFC 1035 §2.3.1 letter-digit-hyphen label, a digit first allowed (RFC 1123 §2.1).
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"{LABEL}(?:\.{LABEL})*")
#: RFC 1035 §2.3.4: a name is at most 255 octets on the wire, 253 written out.
MAX_NAME = 253


def isHostName(name: str, minLabels: int = 1) -> bool:
    """Whether C{name} is LDH labels joined by dots (no trailing dot), at most 253
    characters, with at least C{minLabels} labels."""
    return (len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None
            and name.count(".") + 1 >= minLabels)
