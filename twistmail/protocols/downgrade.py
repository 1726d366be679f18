# -*- test-case-name: tests.test_downgrade -*-
"""Showing a message with raw UTF-8 header fields (RFC 6532) to a legacy client.

SMTPUTF8 mail (RFC 6531) arrives with UTF-8 in its header fields.  An IMAP
client that has not sent ``ENABLE UTF8=ACCEPT`` (RFC 6855 §5) and a POP3
client that has not sent ``UTF8`` (RFC 6856 §2) may not be able to parse
that, so they are shown a downgraded copy, in the manner of RFC 6857
(post-delivery downgrading), as far as this module goes:

* an unstructured field (Subject, Comments, X-...) and any other field that
  is not an address field becomes RFC 2047 encoded-words (the stdlib
  ``email.header``: nothing here writes an encoded-word by hand);
* a non-ASCII parameter of Content-Type or Content-Disposition (a file name)
  becomes an RFC 2231 ``name*=utf-8''...`` parameter (the stdlib's
  ``encode_rfc2231``), so the field still parses;
* in an address field (From, To, Cc, ...) a display name becomes an
  encoded-word; a domain becomes its IDNA A-label (``bücher.example`` ->
  ``xn--bcher-kva.example``); an address whose local part is not ASCII
  cannot be written in ASCII at all, so it becomes an empty group whose
  display name is the encoded original (as RFC 6857 does): the reader sees
  who it was, and a reply cannot go to a wrong address;
* a field whose *name* is not ASCII, or a line that is no field, is dropped
  (no legal spelling exists);
* a field too long or too deeply nested for the stdlib's parsers to read in
  bounded time is encoded as text.

Not done (RFC 6857 goes further): the header fields of a part or an attached
message are downgraded only when fetched on their own (IMAP ``BODY[1.MIME]``,
``BODY[2.HEADER]``), not inside ``BODY[]`` or ``BODY[TEXT]``, and group names
in address fields are not kept.  Only header fields are ever changed: bodies
are never touched.  8-bit octets that are not UTF-8 are read as U+FFFD.
"""

from __future__ import annotations

import re
from email.charset import Charset
from email.header import Header
from email.message import Message
from email.utils import collapse_rfc2231_value, encode_rfc2231, formataddr, getaddresses, quote

#: RFC 5322 §3.6 address fields (and their Resent- forms, §3.6.6).
ADDRESS_FIELDS = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc", "resent-from",
                            "resent-sender", "resent-to", "resent-cc", "resent-bcc"})
#: MIME fields with parameters (RFC 2045 §5, RFC 2183 §2).
PARAMETER_FIELDS = frozenset({"content-type", "content-disposition"})
#: Longer parameter fields are encoded as text: the stdlib's parameter parser takes
#: time quadratic in their number (a crafted field of 4,000 cost minutes).
MAX_PARAMETER_FIELD = 8192
#: Longer address fields are encoded as text too (1 MB of addresses: seconds of parsing).
MAX_ADDRESS_FIELD = 64 * 1024
_UTF8 = Charset("utf-8")
_FIELD_START = re.compile(rb"(?m)^(?![ \t])")


def needed(header: bytes) -> bool:
    """Whether a header block holds anything a legacy client cannot take (8-bit octets)."""
    return not header.isascii()


def text(value: str) -> str:
    """A header value as parsed (raw octets as surrogate escapes) -> real Unicode."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def word(value: str) -> str:
    """C{value} as RFC 2047 encoded-words on one line (words split where the stdlib
    splits them, each at most 75 characters; RFC 2047 §6.2: a decoder joins them)."""
    return Header(value, _UTF8).encode().replace("\n", "")


def header(block: bytes) -> bytes:
    """A header block (up to and including its blank line, if any) with every
    field that holds 8-bit octets downgraded; ASCII fields are kept as they are."""
    if not needed(block):
        return block
    out = []
    # Each field starts a line that does not start with white space (RFC 5322 §2.2.3).
    starts = sorted({0, len(block), *(m.start() for m in _FIELD_START.finditer(block))})
    for start, end in zip(starts, starts[1:], strict=False):
        field = block[start:end]
        if field.isascii():
            out.append(field)
            continue
        name, colon, value = field.partition(b":")
        if not colon or not name.isascii():
            continue  # no ASCII name to write it under
        newline = b"\r\n" if field.endswith(b"\r\n") else b"\n"
        unfolded = re.sub(rb"\r?\n", b"", value).strip().decode("utf-8", "replace")
        label = name.decode("ascii")
        kind = label.strip().lower()
        encoded = ""
        if kind in ADDRESS_FIELDS:
            encoded = addressField(unfolded)
        elif kind in PARAMETER_FIELDS:
            encoded = parameterField(label, unfolded)
        if not encoded:  # not a field with a structure kept, or it could not be read
            encoded = Header(unfolded, _UTF8, header_name=label).encode(
                linesep=newline.decode("ascii"))
        out.append(name + b": " + encoded.encode("ascii") + newline)
    return b"".join(out)


def message(data: bytes, bodyStart: int) -> bytes:
    """A whole message with its header block (C{data[:bodyStart]}) downgraded."""
    head = data[:bodyStart]
    return data if not needed(head) else header(head) + data[bodyStart:]


def addressField(value: str) -> str:
    """An address-list field value (RFC 5322 §3.4) in ASCII, as the module says; ""
    when the stdlib's parser cannot read it without losing some of its non-ASCII text
    (it drops what it does not understand), or when it is too long to parse: the
    caller encodes it as text then."""
    if len(value) > MAX_ADDRESS_FIELD:
        return ""
    try:
        pairs = [(name, address) for name, address in getaddresses([value]) if name or address]
    except RecursionError:  # "((((...": the stdlib parses nested comments recursively
        return ""
    kept = "".join(name + address for name, address in pairs)
    if not {c for c in value if not c.isascii()} <= set(kept):
        return ""
    return ", ".join(_address(name, address) for name, address in pairs)


def parameterField(name: str, value: str) -> str:
    """A Content-Type or Content-Disposition value with its non-ASCII parameters in
    RFC 2231 form; "" if its first part (the type) is not ASCII."""
    if len(value) > MAX_PARAMETER_FIELD:
        return ""
    parsed = Message()
    parsed[name] = value
    params = parsed.get_params(header=name) or [("", "")]
    if not params[0][0] or not params[0][0].isascii():
        return ""
    out = [params[0][0]]
    for key, param in params[1:]:
        if isinstance(param, tuple):  # already RFC 2231 (and so ASCII)
            param = collapse_rfc2231_value(param)
        if not key.isascii():
            continue
        if param.isascii():
            out.append(f'{key}="{quote(param)}"')
        else:
            out.append(f"{key}*={encode_rfc2231(param, 'utf-8')}")  # RFC 2231 §4
    return "; ".join(out)


def _address(name: str, address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    ascii = _asciiAddress(local, domain)
    if ascii is None:
        # No ASCII address exists: an empty group named after it (as RFC 6857 does).
        original = f"{name} <{address}>" if name else address
        return word(original) + ":;"
    return formataddr((name, ascii), _UTF8)


def _asciiAddress(local: str, domain: str) -> str | None:
    if not local.isascii():
        return None
    if not domain:
        return local
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return f"{local}@{domain}"


def envelope(value: list) -> list:
    """An IMAP ENVELOPE (RFC 3501 §7.4.2, as nested lists) with every non-ASCII
    string downgraded: address structures as L{addressField} does, the rest as
    encoded-words."""
    out = []
    for i, item in enumerate(value):
        if 2 <= i <= 7 and item is not None:
            out.append(_addressStructures(item))
        else:
            out.append(data(item))
    return out


def _addressStructures(addresses: list) -> list:
    out: list = []
    for name, route, local, host in addresses:
        name, local, host = (None if v is None else text(v) for v in (name, local, host))
        if local is not None and host is not None and not (local.isascii() and host.isascii()):
            address = _asciiAddress(local, host)
            if address is None:
                original = f"{local}@{host}"
                label = word(f"{name} <{original}>" if name else original)
                out += [[None, None, label, None], [None, None, None, None]]  # an empty group
                continue
            host = address.rpartition("@")[2]
        out.append([data(name), route, data(local), data(host)])
    return out


def data(value):
    """Nested IMAP data (BODYSTRUCTURE, or a string) with every non-ASCII string as
    encoded-words."""
    if isinstance(value, str):
        return value if value.isascii() else word(text(value))
    if isinstance(value, bytes):
        return value if value.isascii() else word(value.decode("utf-8", "replace")).encode("ascii")
    if isinstance(value, list):
        return [data(v) for v in value]
    return value
