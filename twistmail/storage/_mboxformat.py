# -*- test-case-name: tests.test_mbox -*-
"""The mbox file format: mboxrd quoting, From_ lines, and twistmail's metadata headers.

One message in the file (https://www.loc.gov/preservation/digital/formats/fdd/fdd000385.shtml,
mboxrd; RFC 4155 for the From_ line)::

    From MAILER-DAEMON Tue Nov 14 22:13:20 2023\\n          the From_ line (date = INTERNALDATE)
    X-UIDL: 1700000000.M1P2Q3\\n                           |
    X-UID: 17\\n                                            | the metadata block: written by
    X-IMAPbase: 1700000000 0000000042 work\\n               | twistmail, hidden from IMAP and
    Status: RO\\n                                           | POP3 (as Dovecot hides them)
    X-Status: AF  \\n                                       |
    X-Keywords: work                                 \\n   |
    <the message exactly as received, '>' added before any line matching ^>*From >
    \\n                                                     the separator: an empty line

* ``X-UIDL`` (qpopper's name) is the POP3 UIDL; ``X-UID`` and ``X-IMAPbase``
  (UIDVALIDITY, UIDNEXT and keywords, in the first message only) are
  UW-IMAP's and Dovecot's; they are written whenever twistmail rewrites the
  file, and let Dovecot, UW-IMAP or a twistmail whose index was deleted keep
  the UIDs.
* ``Status``/``X-Status``/``X-Keywords`` carry the flags as mutt, Pine,
  Dovecot and Python's ``mailbox`` read them: Status R = \\Seen (O = not
  new); X-Status A = \\Answered, F = \\Flagged, D = \\Deleted, T = \\Draft;
  X-Keywords holds the keywords, space separated.  The values are padded
  with spaces to a fixed width, so a flag change rewrites these bytes in
  place instead of the file (Dovecot pads X-Keywords the same way).
* ``Content-Length`` appears only for a message that does not end with a
  line feed: it gives the exact length, the line feed after it is ours.

The block goes right after the From_ line, so a delivery streams the
message without looking for the end of its header.  Messages other
programs wrote may carry these fields at the end of their header (mutt and
Dovecot put them there): those are hidden too.
"""

from __future__ import annotations

import calendar
import re
import time
from typing import NamedTuple

SYSTEM_LETTERS = {"\\Seen": "S", "\\Answered": "A", "\\Flagged": "F", "\\Deleted": "D",
                  "\\Draft": "T"}
LETTER_FLAGS = {v: k for k, v in SYSTEM_LETTERS.items()}
_X_STATUS = {"\\Answered": "A", "\\Flagged": "F", "\\Deleted": "D", "\\Draft": "T"}
_FROM_X_STATUS = {v: k for k, v in _X_STATUS.items()}

#: Header fields that are metadata, never message content (lower case).  ``Lines``
#: comes with mutt's Content-Length when it rewrites a folder.
METADATA = frozenset({b"x-uidl", b"x-uid", b"x-imapbase", b"x-imap", b"status", b"x-status",
                      b"x-keywords", b"content-length", b"lines"})
#: What rejoins header and body once another program's fields are cut out (see L{Parsed}).
JOINTS = (b"", b"\n", b"\r\n")
#: Room for keywords in X-Keywords beyond what a message has when written.
KEYWORD_ROOM = 64

_QUOTE = re.compile(rb"^(>*From )", re.M)
_UNQUOTE = re.compile(rb"^>(>*From )", re.M)
#: What a line may start with and still turn out to need (un)quoting once the rest arrives.
_PARTIAL = re.compile(rb">*(?:F(?:r(?:o(?:m)?)?)?)?")
_FIELD = re.compile(rb"([A-Za-z-]+):[ \t]?([^\r\n]*)\r?\n")
_FLAGS_REGION = re.compile(rb"Status: [RO ]{2}\nX-Status: [ADFT ]{4}\nX-Keywords: [^\n]*\n")
_ASCTIME = re.compile(rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) +([A-Z][a-z]{2}) +(\d{1,2}) "
                      rb"+(\d{1,2}):(\d\d):(\d\d) +(\d{4})")
_MONTHS = {m.encode(): i for i, m in enumerate(calendar.month_abbr) if m}


def validKeyword(keyword: str) -> bool:
    """Keywords are IMAP atoms: printable ASCII without space (X-Keywords separates with spaces)."""
    return bool(keyword) and all(0x20 < ord(c) < 0x7F for c in keyword)


# -- quoting -------------------------------------------------------------------------


class LineRewriter:
    """Applies mboxrd (un)quoting to a message arriving in chunks of any size."""

    def __init__(self, pattern: re.Pattern, replacement: bytes) -> None:
        self._pattern = pattern
        self._replacement = replacement
        self._pending = b""  # start of a line that may still need rewriting
        self._midLine = False  # inside a line already known not to
        self.count = 0  # lines rewritten
        self.lastByte = b""

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self.lastByte = chunk[-1:]
        data = self._pending + chunk if self._pending else chunk
        self._pending = b""
        out = []
        start = 0
        if self._midLine:
            nl = data.find(b"\n")
            if nl < 0:
                return data
            out.append(data[:nl + 1])
            start = nl + 1
            self._midLine = False
        cut = data.rfind(b"\n", start) + 1
        if cut > start:
            rewritten, n = self._pattern.subn(self._replacement, data[start:cut])
            out.append(rewritten)
            self.count += n
        else:
            cut = start
        tail = data[cut:]
        if tail:
            if _PARTIAL.fullmatch(tail):
                self._pending = tail
            else:
                rewritten, n = self._pattern.subn(self._replacement, tail)
                out.append(rewritten)
                self.count += n
                self._midLine = True
        return b"".join(out)

    def end(self) -> bytes:
        tail, self._pending = self._pending, b""
        return tail


def quoter() -> LineRewriter:
    """mboxrd: one more '>' before every line matching ^>*From ."""
    return LineRewriter(_QUOTE, rb">\1")


def unquoter() -> LineRewriter:
    return LineRewriter(_UNQUOTE, rb"\1")


def unquote(data: bytes) -> bytes:
    return _UNQUOTE.sub(rb"\1", data)


# -- writing ---------------------------------------------------------------------------


def fromLine(internalDate: float) -> bytes:
    """RFC 4155 From_ line; the envelope sender is not kept, as Dovecot does without one."""
    return b"From MAILER-DAEMON " + time.asctime(time.gmtime(int(internalDate))).encode() + b"\n"


def flagsRegion(flags, keywordWidth: int = 0, new: bool = False) -> bytes:
    """The fixed-width Status/X-Status/X-Keywords lines.

    @param keywordWidth: pad X-Keywords' value to at least this many octets
        (0: the value plus L{KEYWORD_ROOM}).
    @param new: a delivered message nobody has seen: no 'O' (mutt shows it as new).
    """
    status = ("R" if "\\Seen" in flags else "") + ("" if new else "O")
    xStatus = "".join(letter for flag, letter in _X_STATUS.items() if flag in flags)
    keywords = " ".join(sorted(f for f in flags if not f.startswith("\\"))).encode("ascii")
    width = keywordWidth or len(keywords) + KEYWORD_ROOM
    return (b"Status: " + status.ljust(2).encode() + b"\nX-Status: " + xStatus.ljust(4).encode()
            + b"\nX-Keywords: " + keywords.ljust(width) + b"\n")


def block(uniqueId: str, flags, uid: int | None = None, base: tuple | None = None,
          contentLength: int | None = None, new: bool = False) -> tuple[bytes, int]:
    """The metadata block; returns it and the offset of its flags region within it.

    @param base: (uidvalidity, uidnext, keywords) for the first message's X-IMAPbase.
    """
    lines = [b"X-UIDL: " + uniqueId.encode("ascii") + b"\n"]
    if uid is not None:
        lines.append(b"X-UID: %d\n" % uid)
    if base is not None:
        validity, uidNext, keywords = base
        lines.append(b"X-IMAPbase: %d %010d" % (validity, uidNext)
                     + b"".join(b" " + k.encode("ascii") for k in keywords) + b"\n")
    if contentLength is not None:
        lines.append(b"Content-Length: %d\n" % contentLength)
    head = b"".join(lines)
    return head + flagsRegion(flags, new=new), len(head)


# -- reading -----------------------------------------------------------------------------


class Parsed(NamedTuple):
    """One message found in the file (offsets are absolute)."""

    offset: int  # the From_ line
    contentAt: int  # after the leading metadata block
    flagsAt: int  # our fixed-width flags region, or 0
    flagsLen: int
    skipFrom: int  # metadata fields at the end of the header (another program's) and the
    skipTo: int  # empty line after them, left out and replaced by JOINTS[joint]: mutt ends
    joint: int  # a header it rewrote with "\n" even when the message's lines end in CRLF
    end: int  # end of the content as stored (quoted)
    size: int  # octets once unquoted, metadata left out: what IMAP and POP3 serve
    quoted: int  # lines that carry an mboxrd '>'
    internalDate: int
    uniqueId: str | None  # X-UIDL
    xUid: int | None
    base: tuple | None  # X-IMAPbase (uidvalidity, uidnext, keywords)
    flags: frozenset


def parseDate(line: bytes) -> int | None:
    """The asctime date of a From_ line, as POSIX time (UTC)."""
    m = _ASCTIME.search(line)
    if m is None or m.group(1) not in _MONTHS:
        return None
    month, day, hour, minute, second, year = (_MONTHS[m.group(1)], *map(int, m.groups()[1:]))
    try:
        return calendar.timegm((year, month, day, hour, minute, second))
    except (ValueError, OverflowError):
        return None


def messageStarts(buf, start: int = 0, stop: int | None = None) -> list[int]:
    """Offsets of the From_ lines in C{buf} (bytes or mmap) between C{start} and C{stop}
    (C{start} is at the beginning of a line)."""
    stop = len(buf) if stop is None else stop
    starts = [start] if buf[start:start + 5] == b"From " else []
    at = buf.find(b"\nFrom ", start, stop)  # find() is a C loop: 20x faster than a regex
    while at >= 0:
        starts.append(at + 1)
        at = buf.find(b"\nFrom ", at + 6, stop)
    return starts


def _fields(buf, pos: int, stop: int, into: dict) -> tuple[int, object]:
    """Read consecutive metadata header lines from C{pos}.

    @return: where they end, and our flags region if they end with it (then
        what follows is the message's own header, whatever its fields).
    """
    while pos < stop:
        if buf[pos:pos + 8] == b"Status: ":
            region = _FLAGS_REGION.match(buf, pos, stop)
            if region is not None:
                for m in _FIELD.finditer(buf, pos, region.end()):
                    into[m.group(1).lower()] = m.group(2)
                return region.end(), region
        m = _FIELD.match(buf, pos, stop)
        if m is None or m.group(1).lower() not in METADATA:
            return pos, None
        into[m.group(1).lower()] = m.group(2)
        pos = m.end()
    return pos, None


def _headerEnd(buf, pos: int, stop: int) -> int:
    """Offset of the empty line that ends the header, or C{stop} if there is none."""
    if buf[pos:pos + 1] == b"\n" or buf[pos:pos + 2] == b"\r\n":
        return pos
    candidates = [i + 1 for i in (buf.find(b"\n\n", pos, stop), buf.find(b"\n\r\n", pos, stop))
                  if i >= 0]
    return min(candidates) if candidates else stop


def _trailingFields(buf, pos: int, headerEnd: int, into: dict) -> int:
    """Start of the run of metadata header lines just before C{headerEnd} (another writer's)."""
    start = headerEnd
    while start > pos:
        lineStart = buf.rfind(b"\n", pos, start - 1) + 1
        if lineStart < pos:
            lineStart = pos
        m = _FIELD.fullmatch(buf, lineStart, start)
        if m is None or m.group(1).lower() not in METADATA:
            break
        into.setdefault(m.group(1).lower(), m.group(2))
        start = lineStart
    return start


def _number(value: bytes | None) -> int | None:
    try:
        return int(value.split()[0]) if value else None
    except ValueError:
        return None


_UIDL = re.compile(r"[\x21-\x7e]{1,70}")


def validUidl(text: str) -> bool:
    """RFC 1939 §7: a unique-id is 1 to 70 characters from 0x21 to 0x7E."""
    return _UIDL.fullmatch(text) is not None


def _uidl(value: bytes | None) -> str | None:
    text = value.strip().decode("ascii", "replace") if value else ""
    return text if validUidl(text) else None


def _flags(fields: dict) -> frozenset:
    flags = set()
    if b"R" in fields.get(b"status", b""):
        flags.add("\\Seen")
    for letter in fields.get(b"x-status", b"").decode("ascii", "replace"):
        if letter in _FROM_X_STATUS:
            flags.add(_FROM_X_STATUS[letter])
    for keyword in fields.get(b"x-keywords", b"").decode("ascii", "replace").split():
        if validKeyword(keyword):
            flags.add(keyword)
    return frozenset(flags)


def parseMessage(buf, offset: int, stop: int, fallbackDate: int) -> Parsed:
    """The message whose From_ line is at C{offset}; the next one (or the end) at C{stop}."""
    lineEnd = buf.find(b"\n", offset, stop)
    fromEnd = stop if lineEnd < 0 else lineEnd + 1
    end = stop - 1 if stop - 1 >= fromEnd and buf[stop - 2:stop] == b"\n\n" else stop
    fields: dict = {}
    contentAt, region = _fields(buf, fromEnd, end, fields)
    if region is not None:
        flagsAt, flagsLen = region.start(), region.end() - region.start()
    else:
        flagsAt = flagsLen = 0
    length = _number(fields.get(b"content-length"))
    if length is not None and end - contentAt == length + 1 and buf[end - 1:end] == b"\n":
        end -= 1  # our line feed after a message that had none
    skipFrom = skipTo = contentAt
    joint = 0
    if region is None:
        # Another program's metadata fields at the end of the header (mutt, Dovecot).
        headerEnd = _headerEnd(buf, contentAt, end)
        start = _trailingFields(buf, contentAt, headerEnd, fields)
        if start < headerEnd:
            blank = buf[headerEnd:headerEnd + 2]
            blankLength = 2 if blank == b"\r\n" else 1 if blank[:1] == b"\n" else 0
            ending = buf[start - 2:start] if start > contentAt else blank
            joint = (2 if ending == b"\r\n" else 1) if blankLength else 0
            skipFrom, skipTo = start, headerEnd + blankLength
    quoted = 0
    if buf.find(b">From ", contentAt, end) >= 0:  # rare: count them only then
        quoted = len(_UNQUOTE.findall(buf, contentAt, skipFrom)) + \
            len(_UNQUOTE.findall(buf, skipTo, end))
    base = None
    if b"x-imapbase" in fields:
        parts = fields[b"x-imapbase"].decode("ascii", "replace").split()
        try:
            base = (int(parts[0]), int(parts[1]), [k for k in parts[2:] if validKeyword(k)])
        except (IndexError, ValueError):
            base = None
    date = parseDate(buf[offset:fromEnd])
    return Parsed(offset, contentAt, flagsAt, flagsLen, skipFrom, skipTo, joint, end,
                  (skipFrom - contentAt) + len(JOINTS[joint]) + (end - skipTo) - quoted, quoted,
                  fallbackDate if date is None else date, _uidl(fields.get(b"x-uidl")),
                  _number(fields.get(b"x-uid")), base, _flags(fields))


def parse(buf, start: int, stop: int, fallbackDate: int) -> list[Parsed]:
    """Every message between C{start} (a From_ line) and C{stop}."""
    starts = messageStarts(buf, start, stop)
    if not starts:
        return []
    return [parseMessage(buf, s, e, fallbackDate)
            for s, e in zip(starts, starts[1:] + [stop], strict=True)]
