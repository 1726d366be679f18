# -*- test-case-name: tests.test_imap_structure -*-
"""MIME structure of a stored message, for FETCH BODY[section], BODYSTRUCTURE and ENVELOPE.

IMAP hands out parts of a message byte for byte (``BODY[1.2]`` is the raw,
still-encoded content of part 1.2), so the parts are located by their byte
offsets here.  The stdlib ``email`` package parses each part's header
fields (``Content-Type`` parameters, RFC 2231 continuations, addresses); it
does not report offsets, which is the only reason the boundaries are found
by hand (RFC 2046 §5.1.1: the CRLF before a delimiter belongs to it).

Nesting is bounded (C{MAX_DEPTH}) so a hostile message of a thousand nested
multiparts costs no more than a flat one.
"""

from __future__ import annotations

import re
from email import utils as emailutils
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

MAX_DEPTH = 32
MAX_PARTS = 2000
MAX_PARAMS_TEXT = 64 * 1024

_PARAM_SPECIALS = re.compile(r'[";]')


def _splitParams(value: str) -> list[str]:
    """C{email.message._parseparam} in linear time, with the same result.

    The stdlib version recounts the quotes from the start of the rest of the
    value at every ``;`` and copies the rest after every parameter: a crafted
    ``Content-Type`` (``boundary=";;;;...``, or thousands of parameters) cost
    seconds per 100 KB, quadratically, for every FETCH BODYSTRUCTURE of it.
    """
    out = []
    start, quoted = 0, False
    for m in _PARAM_SPECIALS.finditer(value):
        i = m.start()
        if value[i] == '"':
            if i == start or value[i - 1] != "\\":  # as _parseparam: \" does not count
                quoted = not quoted
        elif i > start and not quoted or i == start:
            out.append(value[start:i])
            start, quoted = i + 1, False
    out.append(value[start:])
    params = []
    for p in out:
        name, eq, val = p.partition("=")
        params.append((name.strip().lower() if eq else p.strip(), val.strip()))
    return params


class _Headers(Message):
    """Header fields of one entity, with parameter parsing that a hostile message
    cannot make slow or make raise.

    Besides being quadratic, the stdlib raises on RFC 2231 parameters such as
    ``name*=a; name*0=b`` (TypeError sorting None with 0), on a continuation
    number of thousands of digits (int() refuses them), and in
    collapse_rfc2231_value for a charset like ``idna`` or one with a NUL.  Any
    of these in a delivered message made FETCH BODYSTRUCTURE (and the message's
    MIME structure, so BODY[1]...) fail for good.
    """

    def _get_params_preserve(self, failobj, header):
        value = self.get(header)
        if value is None:
            return failobj
        # Parameters past 64 KiB are ignored: no real header has them, and all of
        # a 25 MB one would cost a minute of CPU on every FETCH BODYSTRUCTURE.
        params = _splitParams(_uncommented(str(value)[:MAX_PARAMS_TEXT]))
        try:
            return emailutils.decode_params(params)
        except (ValueError, TypeError):
            return params  # as written, without RFC 2231 decoding

    def get_content_type(self) -> str:
        """As the stdlib's, but a comment (RFC 2045 §5.1) does not make the type unreadable."""
        value = self.get("content-type")
        if value is None:
            return self.get_default_type()
        ctype = "".join(_uncommented(str(value)[:MAX_PARAMS_TEXT]).split(";", 1)[0].split()).lower()
        return ctype if ctype.count("/") == 1 else "text/plain"  # RFC 2045 §5.2

    def get_boundary(self, failobj=None):
        boundary = self.get_param("boundary")
        if boundary is None:
            return failobj
        return _collapse(boundary).rstrip()

    def get_content_charset(self, failobj=None):
        charset = self.get_param("charset")
        if charset is None:
            return failobj
        charset = _collapse(charset)
        return charset.lower() if charset.isascii() and charset.isprintable() else failobj


def _collapse(value) -> str:
    """RFC 2231 value -> text, whatever its charset says."""
    try:
        return emailutils.collapse_rfc2231_value(value)
    except (ValueError, TypeError):  # UnicodeError is a ValueError
        return emailutils.collapse_rfc2231_value(value[2] if isinstance(value, tuple) else value)


def _uncommented(value: str) -> str:
    """C{value} without its RFC 822 comments, skipped only when it has one."""
    return _withoutComments(value) if "(" in value else value


_headerParser = BytesHeaderParser(_class=_Headers, policy=compat32)
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def _fieldsOnly(header: bytes) -> bytes:
    """The header block as the email package can read it.

    The stdlib ends the header at the first line that is not a field, and reads
    ``Content-Type : x`` (white space before the colon, RFC 5322 §4.5.3 obs-
    syntax) as such a line: every field after it was lost, and with it the MIME
    structure.  Dovecot skips a line without a colon and keeps reading, so the
    line is dropped here, and the space before a colon removed.
    """
    out = []
    keep = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        m = _FIELD_NAME.match(line)
        keep = m is not None
        if keep:
            out.append(line if m.end() == len(m.group(1)) + 1 else m.group(1) + b":" + line[m.end():])
        elif not line.strip():
            out.append(line)
    return b"".join(out)
_BLANK = re.compile(rb"\r?\n\r?\n")


class Entity:
    """One MIME entity: a message or a body part, as byte ranges of the stored message.

    C{header} is [headerStart, bodyStart) including the blank line that ends
    it; the body is [bodyStart, end).
    """

    __slots__ = ("data", "headerStart", "bodyStart", "end", "headers", "mainType", "subType",
                 "children", "embedded")

    def __init__(self, data: bytes, headerStart: int, bodyStart: int, end: int, headers,
                 mainType: str, subType: str) -> None:
        self.data = data
        self.headerStart = headerStart
        self.bodyStart = bodyStart
        self.end = end
        self.headers = headers
        self.mainType = mainType
        self.subType = subType
        self.children: list[Entity] = []
        self.embedded: Entity | None = None

    @property
    def header(self) -> bytes:
        return self.data[self.headerStart:self.bodyStart]

    @property
    def body(self) -> bytes:
        return self.data[self.bodyStart:self.end]

    @property
    def isMultipart(self) -> bool:
        return self.mainType == "multipart"

    @property
    def isMessage(self) -> bool:
        return self.embedded is not None


def parse(data: bytes) -> Entity:
    """The structure of a whole stored message."""
    counter = [0]
    return _entity(data, 0, len(data), ("text", "plain"), 0, counter)


def _splitHeader(data: bytes, start: int, end: int) -> int:
    """Where the body starts: after the first empty line (or at C{end} if there is none)."""
    if data.startswith(b"\r\n", start):
        return start + 2
    if data.startswith(b"\n", start):
        return start + 1
    m = _BLANK.search(data, start, end)
    return m.end() if m else end


def _entity(data: bytes, start: int, end: int, default: tuple, depth: int, counter: list) -> Entity:
    bodyStart = _splitHeader(data, start, end)
    headers = _headerParser.parsebytes(_fieldsOnly(data[start:bodyStart]))
    mainType, subType = default
    if headers.get("content-type") is not None:
        ctype = headers.get_content_type()  # text/plain when unparseable (RFC 2045 §5.2)
        mainType, subType = ctype.split("/", 1)
    entity = Entity(data, start, bodyStart, end, headers, mainType, subType)
    counter[0] += 1
    if depth >= MAX_DEPTH or counter[0] > MAX_PARTS:
        return entity
    if mainType == "multipart":
        boundary = headers.get_boundary()
        if boundary:
            childDefault = ("message", "rfc822") if subType == "digest" else ("text", "plain")
            for childStart, childEnd in _parts(data, bodyStart, end, boundary.encode("latin-1")):
                if counter[0] >= MAX_PARTS:
                    break  # not just unparsed: not even looked for (100,000 empty parts cost seconds)
                entity.children.append(
                    _entity(data, childStart, childEnd, childDefault, depth + 1, counter))
        if not entity.children:
            # A multipart without a usable boundary is shown as text (as Dovecot does).
            entity.mainType, entity.subType = "text", "plain"
    elif (mainType, subType) == ("message", "rfc822"):
        entity.embedded = _entity(data, bodyStart, end, ("text", "plain"), depth + 1, counter)
    return entity


def _parts(data: bytes, start: int, end: int, boundary: bytes):
    """(start, end) of each body part between the delimiters of C{boundary}."""
    delimiter = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|$)",
                           re.MULTILINE)
    marker = b"--" + boundary
    partStart = None
    pos = start
    while True:
        m = _nextDelimiter(data, delimiter, marker, pos, end)
        if m is None:
            if partStart is not None:
                yield partStart, end  # unterminated: the last part runs to the end
            return
        if m.start() < start:
            return
        if partStart is not None:
            yield partStart, m.start()
        if m.group(1):  # close-delimiter
            return
        partStart = m.end()
        pos = m.end() if m.end() > m.start() else m.end() + 1
        if pos > end:
            return


def _nextDelimiter(data: bytes, delimiter: re.Pattern, marker: bytes, pos: int, end: int):
    """C{delimiter.search(data, pos, end)}, found with bytes.find.

    A regex scan runs at a few tens of MB/s, and every nesting level scans its
    whole body: a crafted message of 32 nested multiparts around 25 MB cost
    half a minute of CPU per FETCH.  The delimiter starts at most two octets
    (CRLF) before its "--boundary", so only those positions are tried.
    """
    i = data.find(marker, pos, end)
    while i >= 0:
        for candidate in (i - 2, i - 1, i):
            if candidate >= pos:
                m = delimiter.match(data, candidate, end)
                if m is not None:
                    return m
        i = data.find(marker, i + 1, end)
    return None


# -- sections (RFC 3501 §6.4.5) ------------------------------------------------------


class NoSuchPart(Exception):
    """The section names a part the message does not have (answered with an empty string)."""


def subPart(entity: Entity, number: int, top: bool = False) -> Entity:
    """Part C{number} (1-based) of C{entity}, in IMAP's numbering.

    A message/rfc822 part's numbers name the parts of its message's body; the
    C{top} message's own (even of type message/rfc822) name its body's parts.
    """
    if entity.isMessage and not top:
        entity = entity.embedded
    if entity.isMultipart:
        if 1 <= number <= len(entity.children):
            return entity.children[number - 1]
        raise NoSuchPart(number)
    if number == 1:
        return entity  # the body of a single-part message is its part 1
    raise NoSuchPart(number)


def section(root: Entity, parts: tuple[int, ...], text: str | None,
            fields: tuple[str, ...] = ()) -> bytes:
    """The bytes of BODY[parts.text (fields)].

    @param text: None, "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT" or "MIME".
    """
    entity = root
    for i, number in enumerate(parts):
        entity = subPart(entity, number, top=i == 0)
    if text is None:
        if not parts:
            return root.data[root.headerStart:root.end]
        return entity.body
    if text == "MIME":
        return entity.header
    message = entity if not parts else entity.embedded
    if message is None:
        raise NoSuchPart(text)
    if text == "TEXT":
        return message.body
    if text == "HEADER":
        return message.header
    return _headerFields(message.header, fields, text == "HEADER.FIELDS.NOT")


def _headerFields(header: bytes, names: tuple[str, ...], exclude: bool) -> bytes:
    wanted = {n.lower() for n in names}
    out = []
    keep = False
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("latin-1").lower()
        keep = (name in wanted) != exclude
        if keep:
            out.append(line)
    return b"".join(out) + b"\r\n"


# -- BODYSTRUCTURE (RFC 3501 §7.4.2) ------------------------------------------------


def _lines(body: bytes) -> int:
    return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


def rawValues(entity: Entity, name: str) -> list[str]:
    """Every value of header field C{name}, unfolded, as received.

    Raw 8-bit octets come back as surrogate escapes (and go out as the same
    octets): ``get_all`` would turn them into U+FFFD.
    """
    name = name.lower()
    return [re.sub(r"\r?\n", "", value).strip() for key, value in entity.headers.raw_items()
            if key.lower() == name]


def _raw(entity: Entity, name: str) -> str | None:
    values = rawValues(entity, name)
    return values[0] if values else None


def transferEncoding(entity: Entity) -> str | None:
    """Content-Transfer-Encoding without its comments (RFC 2045 §6.1 allows them)."""
    value = _raw(entity, "content-transfer-encoding")
    return None if value is None else _uncommented(value[:MAX_PARAMS_TEXT]).strip() or None


def _params(entity: Entity, header: str) -> list | None:
    params = entity.headers.get_params(header=header) or []
    out = []
    for name, value in params[1:]:
        if isinstance(value, tuple):
            value = _collapse(value)
        out += [name.upper(), value]
    return out or None


def _disposition(entity: Entity):
    value = entity.headers.get("content-disposition")
    if value is None:
        return None
    kind = _uncommented(str(value)[:MAX_PARAMS_TEXT]).split(";", 1)[0].strip()
    return [kind.upper(), _params(entity, "content-disposition")]


def _language(entity: Entity):
    value = _raw(entity, "content-language")
    if value is None:
        return None
    tags = [t.strip() for t in value.split(",") if t.strip()]
    return tags[0] if len(tags) == 1 else tags


def bodyStructure(entity: Entity, extended: bool = True) -> list:
    """The BODYSTRUCTURE (or, with C{extended} false, BODY) of C{entity} as nested lists."""
    if entity.isMultipart:
        out: list = [bodyStructure(child, extended) for child in entity.children]
        out.append(entity.subType.upper())
        if extended:
            out += [_params(entity, "content-type"), _disposition(entity), _language(entity),
                    _raw(entity, "content-location")]
        return out
    params = _params(entity, "content-type")
    if params is None and entity.mainType == "text":
        params = ["CHARSET", "US-ASCII"]
    body = entity.body
    out = [entity.mainType.upper(), entity.subType.upper(), params,
           _raw(entity, "content-id"), _raw(entity, "content-description"),
           (transferEncoding(entity) or "7BIT").upper(), len(body)]
    if entity.isMessage:
        out += [envelope(entity.embedded), bodyStructure(entity.embedded, extended), _lines(body)]
    elif entity.mainType == "text":
        out.append(_lines(body))
    if extended:
        out += [_raw(entity, "content-md5"), _disposition(entity), _language(entity),
                _raw(entity, "content-location")]
    return out


# -- ENVELOPE (RFC 3501 §7.4.2) -----------------------------------------------------


def envelope(message: Entity) -> list:
    fromList = addressList(message, "from")
    return [
        _raw(message, "date"), _raw(message, "subject"), fromList,
        addressList(message, "sender") or fromList,
        addressList(message, "reply-to") or fromList,
        addressList(message, "to"), addressList(message, "cc"), addressList(message, "bcc"),
        _raw(message, "in-reply-to"), _raw(message, "message-id"),
    ]


def addressList(message: Entity, name: str) -> list | None:
    """The addresses of header field C{name} as ENVELOPE lists them (groups marked)."""
    values = rawValues(message, name)
    if not values:
        return None
    out = []
    for value in values:
        for kind, label, members in _groups(value):
            if kind == "group":
                # RFC 3501 §7.4.2: a group is NIL-mailbox-name ... NIL-host markers.
                out.append([None, None, label, None])
                out += _addresses(members)
                out.append([None, None, None, None])
            else:
                out += _addresses(members)
    return out or None


#: The obs-route of a route-addr (RFC 5322 §4.4): ``<@relay.example,@hop:``.
_ROUTE = re.compile(r"<\s*(@[^<>:\"]*?)\s*:")


def _addresses(text: str) -> list:
    """[name, adl, mailbox, host] for each address of C{text} (RFC 3501 §7.4.2)."""
    if "<@" not in text.replace(" ", ""):
        return _routed(text, None)
    out = []
    for element in _elements(text):
        m = _ROUTE.search(element)
        route = "".join(m.group(1).split()) if m else None
        out += _routed(element[:m.start()] + "<" + element[m.end():] if m else element, route)
    return out


def _routed(text: str, route: str | None) -> list:
    try:
        pairs = getaddresses([text])
    except RecursionError:
        # The stdlib parses nested comments recursively: "From: ((((..." a
        # thousand deep raised RecursionError and made FETCH ENVELOPE fail for good.
        pairs = getaddresses([_withoutComments(text)])
    out = []
    for name, address in pairs:
        if not address and not name:
            continue
        mailbox, at, host = address.rpartition("@")
        if not at:
            mailbox, host = address, None
        out.append([name or None, route, mailbox or None, host or None])
    return out


def _elements(value: str) -> list[str]:
    """C{value} split at the commas between addresses (not in quotes, comments or <>)."""
    out = []
    depth = 0
    quoted = angle = False
    start = i = 0
    while i < len(value):
        c = value[i]
        if c == "\\":
            i += 1
        elif quoted:
            quoted = c != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(c, 0)
        elif c == '"':
            quoted = True
        elif c == "(":
            depth = 1
        elif c in "<>":
            angle = c == "<"
        elif c == "," and not angle:
            out.append(value[start:i])
            start = i + 1
        i += 1
    out.append(value[start:])
    return out


def _withoutComments(value: str) -> str:
    """C{value} with its (nested) comments removed; quoted strings kept as they are."""
    out = []
    depth = 0
    quoted = False
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\":
            if not depth:
                out.append(value[i:i + 2])
            i += 2
            continue
        if quoted:
            quoted = c != '"'
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            i += 1
            continue
        elif c == '"' and not depth:
            quoted = True
        if not depth:
            out.append(c)
        i += 1
    return "".join(out)


def _groups(value: str):
    """Split an address-list into ("plain", None, text) and ("group", name, members) pieces."""
    depth = 0  # inside a comment
    quoted = angle = False
    start = 0
    groupName = None
    i = 0
    while i < len(value):
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == '"':
            quoted = True
        elif c == "(":
            depth = 1
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif c == ":" and not angle and groupName is None:
            head = value[start:i]
            lastComma = head.rfind(",")
            if lastComma >= 0:
                yield "plain", None, head[:lastComma]
                head = head[lastComma + 1:]
            groupName = head.strip().strip('"')
            start = i + 1
        elif c == ";" and groupName is not None:
            yield "group", groupName, value[start:i]
            groupName = None
            start = i + 1
        i += 1
    rest = value[start:]
    if groupName is not None:
        yield "group", groupName, rest
    elif rest.strip(" ,"):
        yield "plain", None, rest
