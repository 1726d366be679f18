# -*- test-case-name: tests.test_imap_structure -*-
"""FETCH (RFC 3501 §6.4.5, §7.4.2): which items a client asked for, and their response.

Items that come from the folder index (UID, FLAGS, INTERNALDATE,
RFC822.SIZE) cost no disk access, so ``UID FETCH 1:* (FLAGS)`` on a large
folder is a loop over memory; the others read the message (in a worker
thread) and parse its MIME structure once for all requested items.

A message whose header holds raw UTF-8 (RFC 6532) is shown as it is to a
session that enabled UTF8=ACCEPT, with UTF-8 in quoted strings (RFC 6855
§3, §5); to any other session, ENVELOPE, BODYSTRUCTURE, the header of
BODY[] and RFC822, and every header section (BODY[HEADER], BODY[1.MIME],
BODY[2.HEADER.FIELDS ...], RFC822.HEADER) are downgraded
(L{twistmail.protocols.downgrade}).
RFC822.SIZE stays the stored size: a downgraded copy is a little longer.

Bodies are given as stored, 8-bit or binary (but for NUL: L{_literal}): an
IMAP literal may carry 8-bit octets (RFC 3501 §4.3), and a client that wants a
part decoded asks for it with BINARY (RFC 3516), which is not offered; nothing
is converted to 7-bit here (nor does Dovecot, which offers BINARY instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from twistmail.protocols import downgrade
from twistmail.protocols.imap import response, structure
from twistmail.protocols.imap.parser import Arguments, ParseError

_MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}
_SIMPLE = {b"ENVELOPE", b"FLAGS", b"INTERNALDATE", b"RFC822", b"RFC822.HEADER", b"RFC822.SIZE",
           b"RFC822.TEXT", b"BODY", b"BODYSTRUCTURE", b"UID", b"MODSEQ"}
#: Distinct FETCH attributes in one command.
MAX_ITEMS = 100
_TEXTS = (b"HEADER.FIELDS.NOT", b"HEADER.FIELDS", b"HEADER", b"TEXT", b"MIME")


@dataclass(frozen=True)
class Item:
    """One fetch-att.  For BODY[...]: the section, and the partial range if any."""

    name: bytes
    parts: tuple = ()
    text: str | None = None
    fields: tuple = ()
    partial: tuple | None = None  # (origin, length)
    peek: bool = False

    @property
    def isSection(self) -> bool:
        return self.name == b"BODY[]"

    @property
    def needsMessage(self) -> bool:
        return self.name not in (b"UID", b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"MODSEQ")

    @property
    def setsSeen(self) -> bool:
        """RFC 3501 §6.4.5: BODY[...] (not PEEK), RFC822 and RFC822.TEXT set \\Seen."""
        return (self.isSection and not self.peek) or self.name in (b"RFC822", b"RFC822.TEXT")

    def sectionLabel(self) -> bytes:
        spec = b".".join(b"%d" % n for n in self.parts)
        if self.text:
            spec += (b"." if spec else b"") + self.text.encode()
        if self.fields:
            spec += b" (" + b" ".join(response.astring(f) for f in self.fields) + b")"
        label = b"BODY[" + spec + b"]"
        if self.partial is not None:
            label += b"<%d>" % self.partial[0]
        return label


def parseItems(args: Arguments) -> list[Item]:
    """The fetch attributes after the sequence set: a macro, one att, or a list."""
    word = args.peek(1)
    if word == b"(":
        items = [i for group in args.parenthesized(lambda: _item(args)) for i in group]
    else:
        items = _item(args)
    if not items:
        raise ParseError("empty fetch attribute list")
    # The same item twice is answered once (a 64 KiB line holds 5,000 BODY[]:
    # 5,000 copies of the message in one response), and the distinct ones are few.
    items = list(dict.fromkeys(items))
    if len(items) > MAX_ITEMS:
        raise ParseError(f"too many fetch attributes (at most {MAX_ITEMS})")
    return items


def _item(args: Arguments) -> list[Item]:
    name = args.name().upper()
    if name in _MACROS:
        return [Item(n) for n in _MACROS[name]]
    if name in (b"BODY", b"BODY.PEEK") and args.peek() == b"[":
        return [_section(args, peek=name == b"BODY.PEEK")]
    if name not in _SIMPLE:
        raise ParseError(f"unknown fetch attribute {name[:32].decode('ascii', 'replace')}")
    return [Item(name)]


def _section(args: Arguments, peek: bool) -> Item:
    args.expect(b"[")
    parts: list[int] = []
    text = None
    fields: tuple = ()
    while args.peek().isdigit():
        parts.append(args.number(nonZero=True))
        if not args.accept(b"."):
            break
    if args.peek() != b"]":
        for candidate in _TEXTS:
            if args.accept(candidate):
                text = candidate.decode()
                break
        else:
            raise ParseError("bad section")
        if text == "MIME" and not parts:
            raise ParseError("MIME needs a part number")
        if text.startswith("HEADER.FIELDS"):
            args.sp()
            fields = tuple(f.decode("ascii", "replace") for f in args.parenthesized(args.astring))
            if not fields:
                raise ParseError("empty header list")
    args.expect(b"]")
    partial = None
    if args.accept(b"<"):
        origin = args.number()
        args.expect(b".")
        length = args.number(nonZero=True)
        args.expect(b">")
        partial = (origin, length)
    return Item(b"BODY[]", tuple(parts), text, fields, partial, peek)


class Parsed:
    """A message read for FETCH: its bytes, and its MIME structure when first needed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._root = None
        self._ascii: bool | None = None

    @property
    def ascii(self) -> bool:
        """No 8-bit octet anywhere: nothing to downgrade (most mail; no parse needed to know)."""
        if self._ascii is None:
            self._ascii = self.data.isascii()
        return self._ascii

    @property
    def root(self) -> structure.Entity:
        if self._root is None:
            self._root = structure.parse(self.data)
        return self._root


def render(item: Item, message, parsed: Parsed | None, flags, utf8: bool = False) -> bytes:
    """One ``NAME value`` pair of a FETCH response.

    @param utf8: the session has enabled UTF8=ACCEPT: nothing is downgraded.
    """
    name = item.name
    if name == b"UID":
        return b"UID %d" % message.uid
    if name == b"FLAGS":
        return b"FLAGS " + response.flagList(flags)
    if name == b"INTERNALDATE":
        return b"INTERNALDATE " + response.internalDate(message.internalDate)
    if name == b"RFC822.SIZE":
        return b"RFC822.SIZE %d" % message.size
    if name == b"MODSEQ":
        return b"MODSEQ (%d)" % message.modseq  # RFC 7162 §3.1.4.1
    data = parsed.data
    eightBit = not utf8 and not parsed.ascii  # a legacy session, and maybe something to downgrade
    if name == b"RFC822":
        return b"RFC822 " + _literal(downgrade.message(data, parsed.root.bodyStart) if eightBit
                                     else data)
    root = parsed.root
    legacy = eightBit and downgrade.needed(root.header)
    if name == b"RFC822.HEADER":
        return b"RFC822.HEADER " + _literal(downgrade.header(root.header) if legacy else root.header)
    if name == b"RFC822.TEXT":
        return b"RFC822.TEXT " + _literal(root.body)
    if name == b"ENVELOPE":
        value = structure.envelope(root)
        return b"ENVELOPE " + response.encode(downgrade.envelope(value) if legacy else value, utf8)
    if name in (b"BODYSTRUCTURE", b"BODY"):
        value = structure.bodyStructure(root, name == b"BODYSTRUCTURE")
        if eightBit:  # a part's header may hold UTF-8 too
            value = downgrade.data(value)
        return name + b" " + response.encode(value, utf8)
    try:
        content = structure.section(root, item.parts, item.text, item.fields)
    except structure.NoSuchPart:
        content = b""
    if legacy and not item.parts and item.text is None:
        content = downgrade.message(content, root.bodyStart)  # what a legacy client shows
    elif eightBit and item.text not in (None, "TEXT"):
        content = downgrade.header(content)  # HEADER, HEADER.FIELDS (.NOT), MIME: a header block
    if item.partial is not None:
        origin, length = item.partial
        content = content[origin:origin + length]
    return item.sectionLabel() + b" " + _literal(content)


#: What Dovecot answers for an item whose message text is gone (imap-fetch.c's nil
#: replies): a message expunged by another session that this one still shows.
_NIL_REPLIES = {
    b"ENVELOPE": b"ENVELOPE (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)",
    b"BODY": b'BODY ("text" "plain" NIL NIL NIL "7bit" 0 0)',
    b"BODYSTRUCTURE": b'BODYSTRUCTURE ("text" "plain" NIL NIL NIL "7bit" 0 0 NIL NIL NIL NIL)',
}


def renderGone(item: Item, message, flags) -> bytes:
    """Like L{render}, for a message whose text can no longer be read (RFC 2180 §4.1.2):
    the index items as the session knew them, NIL for the rest."""
    if not item.needsMessage:
        return render(item, message, None, flags)
    if item.isSection:
        return item.sectionLabel() + b" NIL"
    return _NIL_REPLIES.get(item.name, item.name + b" NIL")


def _literal(content: bytes) -> bytes:
    """Message data always as a literal: it may hold 8-bit octets, CR and LF.

    Not NUL (RFC 3501 §4.3, CHAR8): a binary body (BINARYMIME, RFC 3030, or an
    APPEND literal8) has each NUL sent as 0x80, the length kept, as Dovecot does
    (imap-msgpart.c); literal8 is for BINARY (RFC 3516), which is not offered.
    """
    if b"\0" in content:
        content = content.replace(b"\0", b"\x80")
    return b"{%d}\r\n" % len(content) + content
