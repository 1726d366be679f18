# -*- test-case-name: tests.test_imap_parser -*-
"""The argument grammar of RFC 3501 §9, over a framed L{Command}.

Twisted's IMAP4Server parses arguments with string splitting (a quoted
string cannot hold an escaped quote, lists cannot nest, a literal is only
recognised at the very end of a line); this is a small recursive-descent
parser instead.  Every syntax error raises L{ParseError}, which the server
answers with ``BAD`` and a reason, never a traceback.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass

from twistmail.protocols.imap.wire import Literal

#: RFC 3501 §2.3.1.1 / §9: numbers are 32-bit unsigned, message numbers start at 1.
MAX_NUMBER = 2**32 - 1

# atom-specials: ( ) { SP CTL % * " \ ]
_ATOM = re.compile(rb"[^(){ \x00-\x1f\x7f%*\"\\\]]+")
_ASTRING_CHARS = re.compile(rb"[^(){ \x00-\x1f\x7f%*\"\\]+")
_LIST_CHARS = re.compile(rb"[^(){ \x00-\x1f\x7f\"\\]+")
_TAG = re.compile(rb"[^(){ \x00-\x1f\x7f%*\"\\+]+")
_NUMBER = re.compile(rb"\d+")
_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SEQ_SET = re.compile(rb"[0-9*:,]+")
_MONTHS = {m.lower().encode(): i for i, m in enumerate(calendar.month_abbr) if m}
_DATE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})")
_DATE_TIME = re.compile(rb"( \d|\d{2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})")


class ParseError(Exception):
    """Bad syntax: answered with BAD and this message."""


@dataclass(frozen=True)
class SequenceSet:
    """A sequence-set (RFC 3501 §9): ranges whose bounds may be ``*`` (None)."""

    ranges: tuple  # of (low, high) with None for "*"
    saved: bool = False  # "$": the saved search result (RFC 5182 §2.1), UIDs kept by the session

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Ranges as (low, high) inclusive, ``*`` replaced by C{largest}, merged and sorted."""
        out = []
        for low, high in self.ranges:
            low = largest if low is None else low
            high = largest if high is None else high
            if low > high:
                low, high = high, low
            out.append((low, high))
        out.sort()
        merged: list[tuple[int, int]] = []
        for low, high in out:
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        return merged

    def usesStar(self) -> bool:
        return any(low is None or high is None for low, high in self.ranges)


class Arguments:
    """A cursor over a command's pieces: text (bytes) and L{Literal}s."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.index = 0
        self.pos = 0

    # -- low level -------------------------------------------------------------

    @property
    def _text(self) -> bytes | None:
        if self.index < len(self.parts) and isinstance(self.parts[self.index], bytes):
            return self.parts[self.index]
        return None

    def _advance(self) -> None:
        """Past the end of a text piece, step onto what follows (a literal or the next text)."""
        text = self._text
        if text is not None and self.pos >= len(text) and self.index + 1 < len(self.parts):
            self.index += 1
            self.pos = 0

    def atEnd(self) -> bool:
        text = self._text
        return text is not None and self.pos >= len(text) and self.index == len(self.parts) - 1

    def peek(self, n: int = 1) -> bytes:
        """The next C{n} bytes of text (b"" at a literal or at the end)."""
        text = self._text
        if text is None:
            return b""
        return text[self.pos:self.pos + n]

    def _match(self, pattern: re.Pattern, what: str) -> bytes:
        text = self._text
        m = pattern.match(text, self.pos) if text is not None else None
        if m is None:
            raise ParseError(f"expected {what}")
        self.pos = m.end()
        self._advance()
        return m.group(0)

    def expect(self, literal: bytes) -> None:
        if self.peek(len(literal)).upper() != literal.upper():
            raise ParseError(f"expected {literal.decode()!r}")
        self.pos += len(literal)
        self._advance()

    def accept(self, literal: bytes) -> bool:
        if self.peek(len(literal)).upper() == literal.upper():
            self.pos += len(literal)
            self._advance()
            return True
        return False

    def sp(self) -> None:
        self.expect(b" ")

    def end(self) -> None:
        if not self.atEnd():
            raise ParseError("unexpected extra arguments")

    # -- RFC 3501 §9 productions ----------------------------------------------

    def tag(self) -> bytes:
        return self._match(_TAG, "a tag")

    def atom(self) -> bytes:
        return self._match(_ATOM, "an atom")

    def name(self) -> bytes:
        """A keyword such as a FETCH attribute: letters, digits and dots (stops at '[')."""
        return self._match(_NAME, "a name")

    def number(self, nonZero: bool = False) -> int:
        value = _int(self._match(_NUMBER, "a number"))
        if value > MAX_NUMBER or (nonZero and value == 0):
            raise ParseError(f"number out of range: {str(value)[:20]}")
        return value

    def modseq(self, zero: bool = False) -> int:
        """RFC 7162 §7 mod-sequence-value: 1 to 2**63-1 (mod-sequence-valzer: 0 too)."""
        digits = self._match(_NUMBER, "a mod-sequence")
        value = int(digits) if len(digits) <= 20 else 2**63
        if value >= 2**63 or (value == 0 and not zero):
            raise ParseError(f"mod-sequence out of range: {str(value)[:20]}")
        return value

    def quoted(self) -> bytes:
        text = self._text
        if text is None or text[self.pos:self.pos + 1] != b'"':
            raise ParseError("expected a quoted string")
        out = bytearray()
        i = self.pos + 1
        while i < len(text):
            c = text[i]
            if c == 0x22:  # "
                self.pos = i + 1
                self._advance()
                return bytes(out)
            if c == 0x5C:  # backslash: quoted-specials only
                if i + 1 >= len(text) or text[i + 1] not in b'"\\':
                    raise ParseError("bad escape in quoted string")
                i += 1
                c = text[i]
            out.append(c)
            i += 1
        raise ParseError("unterminated quoted string")

    def literal(self, allowSpooled: bool = False) -> bytes | Literal:
        if not self._atLiteral():
            raise ParseError("expected a literal")
        literal = self.parts[self.index]
        self.index += 1
        self.pos = 0
        return literal if allowSpooled else literal.bytes()

    def _atLiteral(self) -> bool:
        return self.index < len(self.parts) and isinstance(self.parts[self.index], Literal)

    def string(self) -> bytes:
        if self._atLiteral():
            return self.literal()
        return self.quoted()

    def astring(self) -> bytes:
        if self._atLiteral() or self.peek() == b'"':
            return self.string()
        return self._match(_ASTRING_CHARS, "an astring")

    def nstring(self) -> bytes | None:
        if self.accept(b"NIL"):
            return None
        return self.string()

    def listMailbox(self) -> bytes:
        """A LIST pattern: like astring, but with the wildcards % and * allowed."""
        if self._atLiteral() or self.peek() == b'"':
            return self.string()
        return self._match(_LIST_CHARS, "a mailbox pattern")

    def flag(self) -> bytes:
        if self.accept(b"\\"):
            if self.accept(b"*"):
                return b"\\*"
            return b"\\" + self.atom()
        return self.atom()

    def flagList(self) -> list[bytes]:
        """``(flag ...)``; also a bare flag or flags without parentheses (STORE allows that)."""
        if not self.accept(b"("):
            flags = [self.flag()]
            while self.peek() == b" " and not self.atEnd():
                self.sp()
                flags.append(self.flag())
            return flags
        flags = []
        while not self.accept(b")"):
            if flags:
                self.sp()
            flags.append(self.flag())
        return flags

    def sequenceSet(self) -> SequenceSet:
        """RFC 3501 §9 sequence-set, or ``$`` (RFC 5182 §3 seq-last-command); 0 and
        numbers over 2^32-1 are syntax errors."""
        if self.accept(b"$"):
            return SequenceSet((), saved=True)
        raw = self._match(_SEQ_SET, "a sequence set")
        ranges = []
        for item in raw.split(b","):
            bounds = item.split(b":")
            if len(bounds) > 2 or not all(bounds):
                raise ParseError(f"bad sequence set {raw[:64].decode()!r}")
            values = []
            for bound in bounds:
                if bound == b"*":
                    values.append(None)
                elif bound.isdigit():
                    n = _int(bound)
                    if n == 0 or n > MAX_NUMBER:
                        raise ParseError(f"bad message number {bound[:16].decode()}")
                    values.append(n)
                else:
                    raise ParseError(f"bad sequence set {raw[:64].decode()!r}")
            ranges.append((values[0], values[-1]))
        return SequenceSet(tuple(ranges))

    def date(self) -> tuple[int, int, int]:
        """date (RFC 3501 §9): d-Mon-yyyy, optionally quoted -> (year, month, day)."""
        quoted = self.accept(b'"')
        raw = self._match(_DATE, "a date like 1-Feb-2024")
        if quoted:
            self.expect(b'"')
        day, month, year = _DATE.fullmatch(raw).groups()
        return _checkDate(int(year), _month(month), int(day))

    def dateTime(self) -> float:
        """date-time (RFC 3501 §9): "dd-Mon-yyyy hh:mm:ss +zzzz" -> POSIX time."""
        text = self.quoted()
        m = _DATE_TIME.fullmatch(text)
        if m is None:
            raise ParseError('expected a date-time like "01-Feb-2024 13:05:00 +0100"')
        day, month, year, hh, mm, ss, sign, zh, zm = m.groups()
        year, month, day = _checkDate(int(year), _month(month), int(day))
        hh, mm, ss = int(hh), int(mm), int(ss)
        if hh > 23 or mm > 59 or ss > 60 or int(zm) > 59:
            raise ParseError("bad time of day")
        offset = (int(zh) * 3600 + int(zm) * 60) * (1 if sign == b"+" else -1)
        return calendar.timegm((year, month, day, hh, mm, min(ss, 59), 0, 0, 0)) - offset

    def parenthesized(self, item) -> list:
        """``( item *(SP item) )`` where C{item} parses one element."""
        self.expect(b"(")
        items = []
        while not self.accept(b")"):
            if items:
                self.sp()
            items.append(item())
        return items


def _int(digits: bytes) -> int:
    """A number of at most 20 digits (anything longer is out of range anyway): int()
    refuses more than 4300 digits with ValueError, answered as a server bug."""
    return int(digits) if len(digits) <= 20 else MAX_NUMBER + 1


def _month(name: bytes) -> int:
    month = _MONTHS.get(name.lower())
    if month is None:
        raise ParseError(f"bad month {name.decode('ascii', 'replace')!r}")
    return month


def _checkDate(year: int, month: int, day: int) -> tuple[int, int, int]:
    if not 1 <= day <= calendar.monthrange(year, month)[1] or year < 1000:
        raise ParseError("no such date")
    return year, month, day
