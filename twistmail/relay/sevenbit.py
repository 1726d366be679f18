"""8-bit to 7-bit MIME conversion, for a next hop that does not offer 8BITMIME.

RFC 6152 §3 leaves a relay two choices for an 8-bit message and a server
without 8BITMIME: convert it to 7 bit or return it.  Like Postfix
(``disable_mime_output_conversion = no``) we convert: each leaf part with
8-bit octets (or long lines) is re-encoded, text as quoted-printable, the rest
as base64 (RFC 2045 §6); 7-bit parts and every header are kept as they are.
A header section with 8-bit octets cannot be converted (that needs SMTPUTF8):
L{NotConvertible}, and the message is returned to its sender (5.6.3).
Conversion breaks a DKIM body signature, as Postfix's does.
"""

from __future__ import annotations

import base64
import email
import email.policy
import quopri
from typing import BinaryIO

#: RFC 5322 §2.1.1: a line is at most 998 octets (plus CRLF).
MAX_LINE = 998
_POLICY = email.policy.compat32.clone(linesep="\r\n")


class NotConvertible(ValueError):
    """The message cannot be sent in 7 bit without changing its headers."""


def needsConversion(data: bytes) -> bool:
    return not data.isascii() or any(len(line) > MAX_LINE for line in data.split(b"\r\n"))


def to7bit(file: BinaryIO) -> bytes:
    """The message in C{file} with every 8-bit part re-encoded (blocking: run in a thread)."""
    data = file.read()
    if not needsConversion(data):
        return data
    end = data.find(b"\r\n\r\n")
    if not data[:end if end >= 0 else len(data)].isascii():
        raise NotConvertible("8-bit octets in the header section")
    message = email.message_from_bytes(data, policy=_POLICY)
    if message.get("MIME-Version") is None:
        message["MIME-Version"] = "1.0"
    for part in message.walk():
        if part.is_multipart():
            continue
        raw = part.get_payload(decode=True) or b""
        if not needsConversion(raw.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")):
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            if part.get_param("charset") is None:
                part.set_param("charset", "unknown-8bit")  # RFC 1428
            text = quopri.encodestring(raw.replace(b"\r\n", b"\n"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            text = base64.encodebytes(raw)
            part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(text.decode("ascii"))
    return message.as_bytes(policy=_POLICY)
