# -*- test-case-name: tests.test_imap_search -*-
"""SEARCH (RFC 3501 §6.4.4): the keys, parsed into a predicate tree and evaluated.

Keys that the folder index answers (flags, sizes, UIDs, internal dates,
sequence numbers) are evaluated in memory; the ones that need the message
(header fields, BODY, TEXT, the SENT* dates) read it, in a worker thread,
only for messages the cheap keys have not already ruled out.

String keys match case-insensitively as substrings of the decoded text:
RFC 2047 encoded words in header fields, and quoted-printable or base64
text parts in their declared charset, as Dovecot does.
"""

from __future__ import annotations

import datetime
import email.utils
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header

from twistmail.protocols.imap import structure
from twistmail.protocols.imap.parser import Arguments, ParseError

_FLAG_KEYS = {
    b"ANSWERED": ("\\Answered", True), b"DELETED": ("\\Deleted", True),
    b"DRAFT": ("\\Draft", True), b"FLAGGED": ("\\Flagged", True), b"SEEN": ("\\Seen", True),
    b"UNANSWERED": ("\\Answered", False), b"UNDELETED": ("\\Deleted", False),
    b"UNDRAFT": ("\\Draft", False), b"UNFLAGGED": ("\\Flagged", False),
    b"UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {b"BCC": "bcc", b"CC": "cc", b"FROM": "from", b"SUBJECT": "subject", b"TO": "to"}
_DATE_KEYS = {b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"}
MAX_DEPTH = 50
#: Every key is evaluated for every message of the folder, the cheap ones on the
#: reactor: 16,000 ALLs in a 64 KiB line times 100,000 messages froze it for minutes.
MAX_KEYS = 256


class BadCharset(Exception):
    """CHARSET names one we cannot search in: NO [BADCHARSET (UTF-8 US-ASCII)]."""


@dataclass
class Candidate:
    """What a key is evaluated on: one message of the selected folder."""

    seq: int
    uid: int
    message: object  # IStoredMessage
    recent: bool
    data: bytes | None = None  # the message, once read

    _root = None
    _text = None
    _decoded = None

    def decoded(self, field: str | None) -> list[str]:
        """The decoded, casefolded values of header field C{field} (None: the whole
        header), decoded once however many keys ask (a crafted header can be long)."""
        if self._decoded is None:
            self._decoded = {}
        values = self._decoded.get(field)
        if values is None:
            if field is None:
                values = [_decodeHeaderBlock(self.root.header).casefold()]
            else:
                values = [decodeHeader(v).casefold() for v in structure.rawValues(self.root, field)]
            self._decoded[field] = values
        return values

    def addresses(self, field: str) -> str:
        """The addresses of C{field}, casefolded, as ``name <@route:mailbox@host>, ...``."""
        key = "address:" + field
        if self._decoded is None:
            self._decoded = {}
        text = self._decoded.get(key)
        if text is None:
            written = []
            for name, route, mailbox, host in structure.addressList(self.root, field) or ():
                address = "@".join(p for p in (mailbox, host) if p)
                if route:
                    address = f"{route}:{address}"
                written.append(f"{decodeHeader(name)} <{address}>" if name else address)
            text = self._decoded[key] = ", ".join(written).casefold()
        return text

    @property
    def root(self) -> structure.Entity:
        if self._root is None:
            self._root = structure.parse(self.data)
        return self._root


class Key:
    """A search key: C{match(candidate)} -> bool; C{needsData} if it reads the message."""

    needsData = False

    def match(self, c: Candidate) -> bool:
        raise NotImplementedError


class _All(Key):
    def match(self, c):
        return True


class _And(Key):
    def __init__(self, keys: list[Key]) -> None:
        # Cheap keys first: the expensive ones then run on fewer messages.
        self.keys = sorted(keys, key=lambda k: k.needsData)
        self.needsData = any(k.needsData for k in keys)

    def match(self, c):
        return all(k.match(c) for k in self.keys)


class _Or(Key):
    def __init__(self, a: Key, b: Key) -> None:
        self.a, self.b = a, b
        self.needsData = a.needsData or b.needsData

    def match(self, c):
        return self.a.match(c) or self.b.match(c)


class _Not(Key):
    def __init__(self, key: Key) -> None:
        self.key = key
        self.needsData = key.needsData

    def match(self, c):
        return not self.key.match(c)


class _Flag(Key):
    def __init__(self, flag: str, present: bool) -> None:
        self.flag, self.present = flag, present

    def match(self, c):
        return (self.flag in c.message.flags) == self.present


class _Recent(Key):
    def __init__(self, new: bool | None) -> None:
        self.new = new  # RECENT: None; NEW: recent and unseen; OLD: not recent

    def match(self, c):
        if self.new is None:
            return c.recent
        if self.new:
            return c.recent and "\\Seen" not in c.message.flags
        return not c.recent


class _Size(Key):
    def __init__(self, size: int, larger: bool) -> None:
        self.size, self.larger = size, larger

    def match(self, c):
        return c.message.size > self.size if self.larger else c.message.size < self.size


class _Set(Key):
    def __init__(self, ranges: list[tuple[int, int]], byUid: bool) -> None:
        # resolve() sorts and merges: a binary search, not a scan of up to 30,000
        # ranges ("1,3,5,...") for every message of the folder.
        self.ranges, self.byUid = ranges, byUid
        self.lows = [low for low, _ in ranges]

    def match(self, c):
        n = c.uid if self.byUid else c.seq
        i = bisect_right(self.lows, n) - 1
        return i >= 0 and n <= self.ranges[i][1]


class _InternalDate(Key):
    def __init__(self, day: datetime.date, op: bytes) -> None:
        self.day, self.op = day, op

    def match(self, c):
        return _compare(datetime.date(*time.localtime(c.message.internalDate)[:3]), self.day, self.op)


class _SentDate(Key):
    needsData = True

    def __init__(self, day: datetime.date, op: bytes) -> None:
        self.day, self.op = day, op

    def match(self, c):
        values = structure.rawValues(c.root, "date")
        if not values:
            return False
        value = values[0]
        try:
            sent = email.utils.parsedate_to_datetime(str(value))
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        return _compare(sent.date(), self.day, self.op)  # its own zone: "disregarding timezone"


def _compare(day: datetime.date, reference: datetime.date, op: bytes) -> bool:
    if op.endswith(b"BEFORE"):
        return day < reference
    if op.endswith(b"ON"):
        return day == reference
    return day >= reference


class _Header(Key):
    needsData = True

    def __init__(self, field: str, text: str) -> None:
        self.field, self.text = field.lower(), text.casefold()

    def match(self, c):
        values = c.decoded(self.field)
        if not values:
            return False
        if not self.text:
            return True  # HEADER field "": the field exists (RFC 3501 §6.4.4)
        return any(self.text in v for v in values)


class _Address(_Header):
    """FROM, TO, CC, BCC: a substring of the decoded field, or of its addresses written
    as Dovecot searches them (``display name <@route:mailbox@domain>``, RFC 2047 words
    decoded, quotes gone), so ``René <rene@`` finds ``"=?utf-8?q?Ren=C3=A9?=" <rene@...>``."""

    def match(self, c):
        return super().match(c) or self.text in c.addresses(self.field)


class _Body(Key):
    needsData = True

    def __init__(self, text: str, withHeader: bool) -> None:
        self.text, self.withHeader = text.casefold(), withHeader

    def match(self, c):
        if self.withHeader and self.text in c.decoded(None)[0]:
            return True
        if c._text is None:
            c._text = "\n".join(_texts(c.root)).casefold()
        return self.text in c._text


class _ModSeq(Key):
    """RFC 7162 §3.1.5: messages whose modseq is at least C{modseq}."""

    def __init__(self, modseq: int) -> None:
        self.modseq = modseq

    def match(self, c):
        return c.message.modseq >= self.modseq


def usesModSeq(key: Key) -> bool:
    """Whether C{key} has a MODSEQ criterion: then SEARCH answers with (MODSEQ n)."""
    if isinstance(key, _ModSeq):
        return True
    if isinstance(key, _And):
        return any(usesModSeq(k) for k in key.keys)
    if isinstance(key, _Or):
        return usesModSeq(key.a) or usesModSeq(key.b)
    return isinstance(key, _Not) and usesModSeq(key.key)


class _Keyword(Key):
    def __init__(self, keyword: str, present: bool) -> None:
        self.keyword, self.present = keyword, present

    def match(self, c):
        return (self.keyword in c.message.flags) == self.present


#: decode_header is quadratic in the number of encoded words (2 MB of them: a
#: minute of CPU, holding the GIL): longer text is decoded in pieces this long.
_DECODE_PIECE = 8192


def decodeHeader(value) -> str:
    text = str(value).replace("\r\n", "").replace("\n", "")
    # Raw 8-bit in a header (not RFC 2047) reaches us as surrogate escapes: read it as UTF-8.
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if len(text) <= _DECODE_PIECE:
        return _decodeWords(text)
    pieces = []
    start = 0
    while start < len(text):
        end = start + _DECODE_PIECE
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)  # between encoded words, not inside one
            end = cut if cut > 0 else end
        pieces.append(_decodeWords(text[start:end]))
        start = end
    return "".join(pieces)


def _decodeWords(text: str) -> str:
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, HeaderParseError):
        # A bad encoded word ("=?utf-8?b?a?=" is not base64) raises HeaderParseError:
        # one such message made every SEARCH FROM/SUBJECT/TEXT of the folder fail.
        return text


def _decodeHeaderBlock(header: bytes) -> str:
    return decodeHeader(header.decode("utf-8", "replace"))


def _texts(entity: structure.Entity, depth: int = 0):
    """The decoded text of every text/* part, for BODY and TEXT."""
    if depth > structure.MAX_DEPTH:
        return
    if entity.isMultipart:
        for child in entity.children:
            yield from _texts(child, depth + 1)
    elif entity.isMessage:
        yield _decodeHeaderBlock(entity.embedded.header)
        yield from _texts(entity.embedded, depth + 1)
    elif entity.mainType == "text":
        yield _decodeBody(entity)


def _decodeBody(entity: structure.Entity) -> str:
    import base64
    import binascii
    import quopri

    body = entity.body
    cte = (structure.transferEncoding(entity) or "").lower()
    try:
        if cte == "base64":
            body = base64.b64decode(body, validate=False)
        elif cte == "quoted-printable":
            body = quopri.decodestring(body)
    except (binascii.Error, ValueError):
        pass
    charset = entity.headers.get_content_charset() or "utf-8"
    try:
        return body.decode(charset, "replace")
    except (LookupError, ValueError):
        # Unknown, not a text encoding ("base64"), or one that refuses "replace"
        # ("idna") or has a NUL in its name (ValueError): a sender chooses it, and
        # an exception here made every SEARCH BODY/TEXT of the folder fail.
        return body.decode("utf-8", "replace")


# -- parsing -------------------------------------------------------------------


def parseCharset(args: Arguments) -> None:
    """[CHARSET name SP]: only UTF-8 and US-ASCII (their strings decode as UTF-8)."""
    if args.peek(8).upper() == b"CHARSET ":
        args.expect(b"CHARSET ")
        charsetArgument(args)


def charsetArgument(args: Arguments) -> None:
    """A charset name and SP (SEARCH's after CHARSET; SORT's and THREAD's, RFC 5256 §3)."""
    charset = args.astring().upper()
    args.sp()
    if charset not in (b"UTF-8", b"US-ASCII", b"UTF8"):
        raise BadCharset(charset.decode("ascii", "replace"))


def parseKeys(args: Arguments, largest: Callable[[bool], int],
              saved: Callable[[], list] = list) -> Key:
    """All search keys to the end of the command, ANDed.

    @param largest: largest(byUid) -> what ``*`` means for a sequence set.
    @param saved: saved() -> the UID ranges ``$`` stands for (RFC 5182).
    """
    count = [0]
    keys = [_key(args, (largest, saved), 0, count)]
    while not args.atEnd():
        args.sp()
        keys.append(_key(args, (largest, saved), 0, count))
    return keys[0] if len(keys) == 1 else _And(keys)


def _sequenceKey(args: Arguments, context: tuple, byUid: bool) -> Key:
    largest, saved = context
    seqset = args.sequenceSet()
    if seqset.saved:
        return _Set(saved(), byUid=True)  # "$" is UIDs, whether after UID or not
    return _Set(seqset.resolve(largest(byUid)), byUid=byUid)


def _string(args: Arguments) -> str:
    return args.astring().decode("utf-8", "replace")


def _key(args: Arguments, largest, depth: int, count: list) -> Key:
    if depth > MAX_DEPTH:
        raise ParseError("search keys nested too deeply")
    count[0] += 1
    if count[0] > MAX_KEYS:
        raise ParseError(f"too many search keys (at most {MAX_KEYS})")
    if args.peek() == b"(":
        keys = args.parenthesized(lambda: _key(args, largest, depth + 1, count))
        if not keys:
            raise ParseError("empty search key list")
        return keys[0] if len(keys) == 1 else _And(keys)
    if args.peek().isdigit() or args.peek() in (b"*", b"$"):
        return _sequenceKey(args, largest, byUid=False)
    name = args.atom().upper()
    if name == b"ALL":
        return _All()
    if name in _FLAG_KEYS:
        return _Flag(*_FLAG_KEYS[name])
    if name in (b"RECENT", b"NEW", b"OLD"):
        return _Recent({b"RECENT": None, b"NEW": True, b"OLD": False}[name])
    args.sp()
    if name == b"NOT":
        return _Not(_key(args, largest, depth + 1, count))
    if name == b"OR":
        a = _key(args, largest, depth + 1, count)
        args.sp()
        return _Or(a, _key(args, largest, depth + 1, count))
    if name in _HEADER_KEYS:
        field = _HEADER_KEYS[name]
        return (_Header if field == "subject" else _Address)(field, _string(args))
    if name == b"HEADER":
        field = _string(args)
        args.sp()
        return _Header(field, _string(args))
    if name in (b"BODY", b"TEXT"):
        return _Body(_string(args), withHeader=name == b"TEXT")
    if name in (b"KEYWORD", b"UNKEYWORD"):
        return _Keyword(args.atom().decode("utf-8", "replace"), name == b"KEYWORD")
    if name in (b"LARGER", b"SMALLER"):
        return _Size(args.number(), name == b"LARGER")
    if name == b"UID":
        return _sequenceKey(args, largest, byUid=True)
    if name == b"MODSEQ":
        if args.peek() == b'"':
            # [entry-name SP entry-type-req SP]: flags share one modseq here (RFC 7162 §3.1.5)
            args.quoted()
            args.sp()
            if args.atom().lower() not in (b"priv", b"shared", b"all"):
                raise ParseError("MODSEQ entry type is priv, shared or all")
            args.sp()
        return _ModSeq(args.modseq(zero=True))
    if name in _DATE_KEYS:
        day = datetime.date(*args.date())
        return (_SentDate if name.startswith(b"SENT") else _InternalDate)(day, name)
    raise ParseError(f"unknown search key {name[:32].decode('ascii', 'replace')}")

