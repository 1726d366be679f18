# -*- test-case-name: tests.test_received -*-
"""The ``Received:`` trace field we prepend to every message (RFC 5321 §4.4)."""

from __future__ import annotations

import re
import time
from email.utils import formatdate

_PRINTABLE = re.compile(rb"[^\x21-\x7e]")
_UNPRINTABLE_UTF8 = re.compile(rb"[\x00-\x20\x7f]")

_dateCache: tuple[int, bytes] = (0, b"")


def now() -> bytes:
    """RFC 5322 §3.3 date-time, formatted once per second."""
    global _dateCache
    second = int(time.time())
    if _dateCache[0] != second:
        _dateCache = (second, formatdate(second, localtime=True).encode())
    return _dateCache[1]


def withProtocol(esmtp: bool, tls: bool, authenticated: bool, utf8: bool = False) -> bytes:
    """RFC 3848 §2 with-protocol type: SMTP after HELO; ESMTP, then S for TLS and A for
    SMTP AUTH (ESMTPSA for both).  STARTTLS and AUTH both need EHLO.  A transaction
    with SMTPUTF8 is UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA (RFC 6531 §3.7.3)."""
    if not esmtp:
        return b"SMTP"
    return (b"UTF8SMTP" if utf8 else b"ESMTP") + (b"S" if tls else b"") + \
        (b"A" if authenticated else b"")


def receivedHeader(host: bytes, txid: str, protocol: bytes, helo: bytes | None, address: str,
                   recipients: list[str], showClient: bool = True, utf8: bool = False) -> bytes:
    """RFC 5321 §4.4 trace field; ``for`` only with a single recipient (as Postfix).

    @param utf8: an SMTPUTF8 transaction: the ``for`` address stays UTF-8 (RFC 6531 §3.7.3).
    @param showClient: False leaves out the ``from`` clause (the client's HELO name
        and address): ``[submission] received_client_address = false`` for an
        authenticated user's privacy.
    """
    header = b"Received: "
    if showClient:
        name = _PRINTABLE.sub(b"?", (helo or b"unknown")[:255])
        header += b"from " + name + b" ([" + address.encode("ascii", "replace") + b"])\r\n\t"
    header += b"by " + host + b" (twistmail) with " + protocol + b" id " + txid.encode()
    if len(recipients) == 1:
        recipient = recipients[0].encode("utf-8", "replace")
        header += b"\r\n\tfor <" + (_UNPRINTABLE_UTF8 if utf8 else _PRINTABLE).sub(
            b"?", recipient) + b">"
    return header + b"; " + now() + b"\r\n"
