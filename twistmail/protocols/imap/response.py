# -*- test-case-name: tests.test_imap_structure -*-
"""Writing IMAP data: atoms, quoted strings, literals, NIL and parenthesized lists."""

from __future__ import annotations

import re
import time

_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")
#: RFC 6855 §3 uQUOTED-CHAR: after ENABLE UTF8=ACCEPT a quoted string may hold UTF-8.
_QUOTABLE_UTF8 = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\xff]*")


class Atom(bytes):
    """Written as is: flags, keywords, NIL-free tokens like ``\\Seen`` or ``CHARSET``."""


def string(value: bytes | str, utf8: bool = False) -> bytes:
    """A quoted string where possible, else a literal (8-bit, CR, LF, NUL, very long).

    @param utf8: the session has enabled UTF8=ACCEPT, so valid UTF-8 may be quoted.
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if len(value) < 1024 and (_QUOTABLE.fullmatch(value) or utf8 and _isQuotableUtf8(value)):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value


def _isQuotableUtf8(value: bytes) -> bool:
    if not _QUOTABLE_UTF8.fullmatch(value):
        return False
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def sequenceSet(numbers) -> bytes:
    """1,2,3,5 -> ``1:3,5``, in the order given (COPYUID pairs two such sets by position;
    APPENDUID, ESEARCH ALL)."""
    return rangeSet(runs(numbers))


def rangeSet(ranges) -> bytes:
    """[(1, 3), (5, 5)] -> ``1:3,5``."""
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in ranges)


def runs(numbers) -> list[tuple[int, int]]:
    """1,2,3,5 -> [(1, 3), (5, 5)]: consecutive numbers as one range, in the order given."""
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [(a, b) for a, b in out]


def astring(value: bytes | str, utf8: bool = False) -> bytes:
    """A mailbox name or similar: an atom when it is one, else a string."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if value and value.isascii() and re.fullmatch(rb"[^(){ \x00-\x1f\x7f%*\"\\]+", value):
        return value
    return string(value, utf8)


def encode(value, utf8: bool = False) -> bytes:
    """Nested lists of None, int, str, bytes and Atom -> IMAP syntax (UTF-8 quoted if C{utf8})."""
    if value is None:
        return b"NIL"
    if isinstance(value, Atom):
        return bytes(value)
    if isinstance(value, (bytes, str)):
        return string(value, utf8)
    if isinstance(value, bool):
        raise TypeError("no booleans in IMAP data")
    if isinstance(value, int):
        return b"%d" % value
    return b"(" + b" ".join(encode(v, utf8) for v in value) + b")"


_flagLists: dict = {}


def flagList(flags) -> bytes:
    """``(\\Seen $Label)``; remembered per flag set (a folder has few distinct ones)."""
    if isinstance(flags, frozenset):
        cached = _flagLists.get(flags)
        if cached is not None:
            return cached
    encoded = b"(" + b" ".join(f.encode("utf-8", "surrogateescape") if isinstance(f, str) else f
                               for f in sorted(flags)) + b")"
    if isinstance(flags, frozenset) and len(_flagLists) < 4096:
        _flagLists[flags] = encoded
    return encoded


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internalDate(when: float) -> bytes:
    """date-time (RFC 3501 §9) in the server's local time zone (English months, whatever the locale)."""
    t = time.localtime(when)
    offset = abs(t.tm_gmtoff) // 60
    sign = "+" if t.tm_gmtoff >= 0 else "-"
    return (f'"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} '
            f'{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{offset // 60:02d}{offset % 60:02d}"'
            ).encode("ascii")
