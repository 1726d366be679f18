# -*- test-case-name: tests.test_filters -*-
"""The header section filters see, and the Authentication-Results we never trust.

Only the header section is read and parsed, never the body, and at most
L{HEADER_LIMIT} octets of it: like Postfix's ``header_size_limit`` a huge
header section is cut at a line boundary, not held in memory.  These
functions read the spool, so the caller runs them off the reactor thread when
the spool is on disk (L{twistmail.delivery.spool.MessageSource.inMemory}).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email import policy
from email.parser import BytesHeaderParser

from twistmail.delivery.spool import MessageSource

#: Octets of header section parsed for filters (Postfix's header_size_limit is per
#: header, 100 KiB; this bounds the section).  What lies beyond is not seen by filters.
HEADER_LIMIT = 1024 * 1024
_END = re.compile(rb"\r?\n\r?\n")
_FIELD_START = re.compile(rb"^(?=[^ \t])", re.MULTILINE)
_AUTH_RESULTS = re.compile(rb"authentication-results[ \t]*:", re.IGNORECASE)
_COMMENT = re.compile(rb"\([^()]*\)")
#: RFC 5322 §3.6.8 field name.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def headerSection(chunks) -> bytes:
    """The header section at the start of C{chunks}, with its last line's line
    break, cut to L{HEADER_LIMIT} octets at the last whole line."""
    data = b""
    for chunk in chunks:
        data += chunk
        if len(data) > HEADER_LIMIT or _END.search(data):
            break
    if data[:1] in (b"\n", b"\r"):
        return b""  # no header section at all
    data = data[:HEADER_LIMIT + 1]
    end = _END.search(data)
    if end is not None:
        return data[:end.start() + (2 if data[end.start()] == 13 else 1)]
    return data[:data.rfind(b"\n") + 1]


def parseHeaders(section: bytes):
    """An C{email.message.EmailMessage} of the header section (``policy.default``).

    The parser reads Content-Type as it goes, and on crafted values (an RFC 2231
    section number of 5,000 digits) the email package raises; the section is then
    parsed again with ``compat32``, which keeps every field as its raw text, so a
    filter still sees the header and the message is not refused for our parser's sake.
    """
    try:
        return BytesHeaderParser(policy=policy.default).parsebytes(section)
    except Exception:
        return BytesHeaderParser(policy=policy.compat32).parsebytes(section)


def _fields(section: bytes) -> list[bytes]:
    """The header fields of C{section}, each with its folded lines."""
    return [f for f in _FIELD_START.split(section) if f]


def claimsAuthservId(field: bytes, hostname: str) -> bool:
    """An Authentication-Results field whose authserv-id is C{hostname} (RFC 8601 §2.2:
    the first token of the value, before any version and the first ";")."""
    match = _AUTH_RESULTS.match(field)
    if match is None:
        return False
    value = _COMMENT.sub(b" ", field[match.end():].split(b";", 1)[0])
    token = (value.split() or [b""])[0].strip(b'"')
    return token.decode("ascii", "replace").lower().rstrip(".") == hostname.lower().rstrip(".")


def withoutOurAuthResults(source: MessageSource, hostname: str) -> MessageSource | None:
    """RFC 8601 §5: an MTA removes Authentication-Results fields that claim its own
    authserv-id before it adds its own, since a sender could forge them.

    @return: a new spool without them (same prefix), or None when there are none,
        so a message without such a field is never copied.
    """
    section = headerSection(source.bodyChunks())
    fields = _fields(section)
    kept = [f for f in fields if not claimsAuthservId(f, hostname)]
    if len(kept) == len(fields):
        return None
    clean = MessageSource(prefix=source.prefix, spoolDir=source.spoolDir)
    clean.write(b"".join(kept))
    skip = len(section)
    for chunk in source.bodyChunks():
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        clean.write(chunk[skip:])
        skip = 0
    return clean


def headerLines(headers: Sequence[tuple[str, str]]) -> bytes:
    """(name, value) pairs as header field lines; a line break in a value that is not a
    fold becomes one (RFC 5322 §2.2.3), so a filter cannot end the header section."""
    out = []
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header field name")
        lines = [line for line in re.split(r"\r\n|\r|\n", value)]
        folded = lines[0] + "".join("\r\n" + (line if line[:1] in (" ", "\t") else "\t" + line)
                                    for line in lines[1:] if line.strip())
        out.append(f"{name}: {folded}\r\n".encode())
    return b"".join(out)
