"""Delivery status notification requests (RFC 3461): the MAIL and RCPT parameters.

``RET`` and ``ENVID`` belong to the message, ``NOTIFY`` and ``ORCPT`` to each
recipient.  They are parsed here, checked strictly (a bad one is ``501 5.5.4``,
never half-accepted), kept in the queue entry's ``extra["dsn"]`` as plain JSON,
and read back by the relay (to pass them on) and by the report builder
(L{twistmail.relay.bounce}).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

#: RFC 3461 §4.4: ENVID is at most 100 characters (after xtext decoding).
MAX_ENVID = 100
#: RFC 3461 §4.2: ORCPT is at most 500 characters (the whole value).
MAX_ORCPT = 500
#: RFC 3461 §4.1: NEVER alone, or any of the others.
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
#: RFC 3461 §4.1: without NOTIFY, "FAILURE" or "FAILURE,DELAY" at the server's choice
#: (Postfix and Sendmail: both).
DEFAULT_NOTIFY = ("FAILURE", "DELAY")

# RFC 3461 §4: xchar is "!" through "~" except "+" and "="; hexchar is "+" and two
# upper-case hex digits.
_XTEXT = re.compile(rb"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_HEX = re.compile(rb"\+([0-9A-F]{2})")
# RFC 3461 §4.2: addr-type is an atom (RFC 822): "rfc822" or "utf-8" and the like.
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9-]{1,20}$")


class DSNError(ValueError):
    """A DSN parameter the client must fix: the text of a ``501 5.5.4`` reply."""


def decodeXtext(value: bytes, what: str) -> str:
    """RFC 3461 §4: the text of an xtext; DSNError if it is not one."""
    if not _XTEXT.match(value):
        raise DSNError(f"{what} is not valid xtext (RFC 3461 section 4)")
    return _HEX.sub(lambda m: bytes([int(m.group(1), 16)]), value).decode("latin-1")


def encodeXtext(text: str) -> str:
    """RFC 3461 §4: "+", "=", controls, space and 8-bit as "+XX" (UTF-8 octets)."""
    return "".join(c if 0x21 <= ord(c) <= 0x7e and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in text)


@dataclass
class Request:
    """What the client asked for one message: RET and ENVID, and per recipient
    (by address as routed) NOTIFY and ORCPT."""

    ret: str = ""  # "FULL", "HDRS" or "" (not said: we return headers only, RFC 3461 §4.3)
    envid: str = ""
    notify: dict[str, list[str]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)  # "rfc822;alice@example.test"

    def notifies(self, address: str, event: str) -> bool:
        """Whether C{address}'s sender asked to hear of C{event} (SUCCESS, FAILURE, DELAY)."""
        return event in self.notify.get(address, DEFAULT_NOTIFY)

    def asked(self) -> bool:
        return bool(self.ret or self.envid or self.notify or self.orcpt)

    def toJSON(self) -> dict:
        return asdict(self)

    @classmethod
    def fromJSON(cls, document: dict | None) -> Request:
        if not document:
            return cls()
        return cls(str(document.get("ret", "")), str(document.get("envid", "")),
                   {str(k): [str(v) for v in vs] for k, vs in document.get("notify", {}).items()},
                   {str(k): str(v) for k, v in document.get("orcpt", {}).items()})


def parseMailParam(request: Request, key: bytes, value: bytes) -> bool:
    """RET= or ENVID= into C{request}; False if C{key} is not a DSN parameter.

    @raise DSNError: a bad or repeated value (RFC 3461 §4.3, §4.4).
    """
    if key == b"RET":
        if request.ret:
            raise DSNError("RET given twice")
        if value.upper() not in (b"FULL", b"HDRS"):
            raise DSNError("RET must be FULL or HDRS (RFC 3461 section 4.3)")
        request.ret = value.upper().decode()
        return True
    if key == b"ENVID":
        if request.envid:
            raise DSNError("ENVID given twice")
        if len(value) > 3 * MAX_ENVID:
            raise DSNError(f"ENVID longer than {MAX_ENVID} characters (RFC 3461 section 4.4)")
        envid = decodeXtext(value, "ENVID")
        if not envid or len(envid) > MAX_ENVID or not envid.isprintable() or not envid.isascii():
            raise DSNError(f"ENVID must be 1 to {MAX_ENVID} printable US-ASCII characters "
                           "(RFC 3461 section 4.4)")
        request.envid = envid
        return True
    return False


def parseRcptParams(params: list[tuple[bytes, bytes]]) -> tuple[list[str] | None, str | None]:
    """(NOTIFY keywords, ORCPT as "type;address") of one RCPT's NOTIFY= and ORCPT=,
    None for those not given; other keys are left to the caller.

    @raise DSNError: RFC 3461 §4.1 (NEVER alone, known keywords) or §4.2 (xtext, length).
    """
    notify = orcpt = None
    for key, value in params:
        if key == b"NOTIFY":
            if notify is not None:
                raise DSNError("NOTIFY given twice")
            words = value.upper().decode("ascii", "replace").split(",")
            if words == ["NEVER"]:
                notify = []
            elif words and set(words) <= NOTIFY_KEYWORDS and len(set(words)) == len(words):
                notify = words
            else:
                raise DSNError("NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY "
                               "separated by commas (RFC 3461 section 4.1)")
        elif key == b"ORCPT":
            if orcpt is not None:
                raise DSNError("ORCPT given twice")
            if len(value) > MAX_ORCPT:
                raise DSNError(f"ORCPT longer than {MAX_ORCPT} characters "
                               "(RFC 3461 section 4.2)")
            kind, semi, address = value.partition(b";")
            kind = kind.decode("ascii", "replace")
            if not semi or not _ADDR_TYPE.match(kind):
                raise DSNError("ORCPT must be addr-type;xtext, e.g. rfc822;user@example.org "
                               "(RFC 3461 section 4.2)")
            text = decodeXtext(address, "ORCPT")
            if not text or not text.isprintable():
                raise DSNError("ORCPT needs an address without control characters "
                               "(RFC 3461 section 4.2)")
            orcpt = f"{kind};{text}"
    return notify, orcpt


def queueExtra(envelope) -> dict:
    """What a queue entry keeps of C{envelope}'s requests (L{QueueEntry.extra})."""
    extra: dict = {}
    if envelope.dsn is not None and envelope.dsn.asked():
        extra["dsn"] = envelope.dsn.toJSON()
    if envelope.body != "7BIT":
        extra["body"] = envelope.body
    if envelope.requireTLS:
        extra["requiretls"] = True  # RFC 8689 (L{QueueEntry.requiresTLS})
    elif envelope.tlsOptional:
        extra["tls_optional"] = True
    return extra


def ofEntry(entry) -> Request:
    """The DSN request kept in a queue entry (none: the defaults)."""
    return Request.fromJSON(entry.extra.get("dsn"))


def mailParameters(request: Request, extensions: frozenset) -> bytes:
    """RET= and ENVID= for our MAIL FROM to a server offering DSN (RFC 3461 §5.2)."""
    if b"DSN" not in extensions:
        return b""
    out = b""
    if request.ret:
        out += b" RET=" + request.ret.encode()
    if request.envid:
        out += b" ENVID=" + encodeXtext(request.envid).encode()
    return out


def rcptParameters(request: Request, address: str, extensions: frozenset) -> bytes:
    """NOTIFY= and ORCPT= for one RCPT TO to a server offering DSN (RFC 3461 §5.2): what
    the sender asked, or our default, so the next hop reports what we would have."""
    if b"DSN" not in extensions:
        return b""
    notify = request.notify.get(address, DEFAULT_NOTIFY)
    out = b" NOTIFY=" + (",".join(notify) if notify else "NEVER").encode()
    if address in request.orcpt:
        kind, _, original = request.orcpt[address].partition(";")
        out += f" ORCPT={kind};{encodeXtext(original)}".encode()
    return out
