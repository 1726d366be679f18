# -*- test-case-name: tests.test_relay_bounce -*-
"""Delivery status notifications: RFC 3464 multipart/report.

A report goes to the original sender from the null reverse-path ``<>``
(RFC 5321 §4.5.5, so a report can never bounce back), lists the recipients
with the remote server's reply, and carries the original message's header
section (``text/rfc822-headers``), or the whole message (``message/rfc822``)
when the sender asked ``RET=FULL`` (RFC 3461 §4.3) and it is at most
L{FULL_LIMIT} octets.  The sender's ENVID and each recipient's ORCPT are in it
(RFC 3464 §2.2.1, §2.3.1).  Besides failures ("failed") it reports delays
("delayed"), local delivery ("delivered") and a hand-over to a server without
DSN ("relayed", RFC 3461 §4.1) when the sender's NOTIFY asked for them.

A report about a message sent with REQUIRETLS (RFC 8689 §5) carries its header
section only, whatever RET says, and is itself queued with REQUIRETLS: the
relay passes it on where the next hop offers it (and, the report being from
``<>``, sends it where it is not offered rather than lose it).

The report about a message that came with SMTPUTF8 is an RFC 6533 one:
``message/global-delivery-status`` (a UTF-8 address as ``utf-8; address``),
with ``message/global-headers`` or ``message/global``, its own header fields
UTF-8 where the sender's address is (RFC 6532), and it is queued with SMTPUTF8
itself, so it reaches a UTF-8 sender and is relayed as L{twistmail.relay.smtputf8} says.
"""

from __future__ import annotations

import email.generator
import email.policy
import io
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

from twisted.internet import defer
from twisted.logger import Logger

from twistmail._logtext import loggable
from twistmail.dsn import encodeXtext, ofEntry
from twistmail.relay.queue import QueueEntry, Recipient

log = Logger()

#: RFC 3463 X.4.7: delivery time expired.
EXPIRED = "4.4.7"
#: RET=FULL returns messages up to this size whole, larger ones as headers (Postfix's
#: bounce_size_limit default: 50,000).
FULL_LIMIT = 50_000

FAILED, DELAYED, DELIVERED, RELAYED = "failed", "delayed", "delivered", "relayed"
#: Subject and first paragraph per action.
_WORDS = {
    FAILED: ("Undelivered Mail Returned to Sender",
             "Your message could not be delivered to one or more recipients.\n"
             "The reasons the remote servers or this server gave are below."),
    DELAYED: ("Delayed Mail (still being retried)",
              "Your message could not be delivered yet to one or more recipients.\n"
              "It will be retried until it expires; you need not send it again."),
    DELIVERED: ("Successful Mail Delivery Report",
                "Your message was delivered to the recipients below."),
    RELAYED: ("Successful Mail Delivery Report",
              "Your message was handed to a server that will not report further; it\n"
              "may or may not notify you of its delivery."),
}


def _status(recipient: Recipient, expired: bool) -> str:
    parts = recipient.last_reply.split(None, 2)
    status = parts[1] if len(parts) > 1 and parts[1][:1] in "245" and parts[1].count(".") == 2 \
        else f"{recipient.last_reply[:1] or '5'}.0.0"
    return EXPIRED if expired and status.startswith("4") else status


def _shown(text: str) -> str:
    """Decoded, as Postfix shows it, unless that is not printable US-ASCII: then xtext."""
    return text if text.isascii() and text.isprintable() else encodeXtext(text)


def _block(fields: list[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in fields:
        block[name] = value
    return block


def buildBounce(entry: QueueEntry, failed: list[Recipient], headers: bytes, hostname: str,
                now: float, expired: set[str] = frozenset(), action: str = FAILED,
                message: bytes | None = None) -> bytes:
    """The DSN for C{failed} recipients of C{entry}, as the bytes to queue (CRLF lines).

    @param headers: the original message's header section.
    @param expired: addresses that failed because the queue lifetime ran out.
    @param action: RFC 3464 §2.3.3 Action of every recipient listed.
    @param message: the whole original message, returned when RET=FULL.
    """
    request = ofEntry(entry)
    utf8 = isUTF8(entry)
    subject, intro = _WORDS[action]
    report = MIMEMultipart("report", report_type="global-delivery-status" if utf8
                           else "delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{entry.sender}>"
    report["Subject"] = subject
    report["Date"] = formatdate(now, localtime=True)
    report["Message-ID"] = make_msgid("bounce", domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no auto-replies to this

    lines = [f"This is the mail system at host {hostname}.", "", *intro.split("\n"), ""]
    for r in failed:
        why = "gave up after the maximum time in the queue; last error: " \
            if r.address in expired else ""
        lines.append(f"<{r.address}>: {why}{r.last_reply}")
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "us-ascii"
                           if all(line.isascii() for line in lines) else "utf-8"))

    status = Message()
    status["Content-Type"] = "message/global-delivery-status" if utf8 else "message/delivery-status"
    envelope = [("Reporting-MTA", f"dns; {hostname}")]
    if request.envid:  # RFC 3464 §2.2.1 (printable US-ASCII: checked at MAIL)
        envelope.append(("Original-Envelope-Id", request.envid))
    envelope += [("X-Twistmail-Queue-ID", entry.id),
                 ("Arrival-Date", formatdate(entry.created, localtime=True))]
    blocks = [_block(envelope)]
    for r in failed:
        fields = []
        if r.address in request.orcpt:  # RFC 3464 §2.3.1
            kind, _, address = request.orcpt[r.address].partition(";")
            fields.append(("Original-Recipient", f"{kind}; {_shown(address)}"))
        kind = "rfc822" if r.address.isascii() else "utf-8"  # RFC 6533 §3
        fields += [("Final-Recipient", f"{kind}; {r.address}"), ("Action", action),
                   ("Status", _status(r, r.address in expired))]
        if r.remote_host:
            fields.append(("Remote-MTA", f"dns; {r.remote_host}"))
        kind = "smtp" if r.remote_host else "X-Twistmail"
        fields.append(("Diagnostic-Code", f"{kind}; {r.last_reply}"))
        if r.last_attempt is not None:
            fields.append(("Last-Attempt-Date", formatdate(r.last_attempt, localtime=True)))
        blocks.append(_block(fields))
    if utf8:  # the generator knows only message/delivery-status: written out here
        status["Content-Transfer-Encoding"] = "8bit"
        status.set_payload(_eightBit("\r\n".join(
            "".join(f"{name}: {value}\r\n" for name, value in block.items()) for block in blocks)))
    else:
        status.set_payload(blocks)
    report.attach(status)

    full = request.ret == "FULL" and message is not None and len(message) <= FULL_LIMIT \
        and not entry.requiresTLS()  # RFC 8689 §5: as if RET=HDRS
    original = Message()
    original["Content-Type"] = ("message/global" if full else "message/global-headers") \
        if utf8 else "message/rfc822" if full else "text/rfc822-headers"
    returned = message if full else headers
    # surrogateescape: the generator writes the original octets back unchanged.
    text = returned.decode("ascii", "surrogateescape")
    eightBit = not returned.isascii()
    if eightBit:
        original["Content-Transfer-Encoding"] = "8bit"
    original.set_payload(text if utf8 or eightBit else text.replace("\r\n", "\n"))
    report.attach(original)
    if not utf8 and not eightBit:
        return report.as_bytes(policy=email.policy.SMTP)
    # An 8-bit message/* part (RFC 6152, RFC 6532): the stock generator allows only ASCII.
    out = io.BytesIO()
    _EightBitGenerator(out, policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP
                       ).flatten(report)
    return out.getvalue()


def reportExtra(entry: QueueEntry, report: bytes) -> dict:
    """What the report's own queue entry keeps: C{entry}'s REQUIRETLS and SMTPUTF8, and
    8BITMIME when it returns 8-bit octets (so the relay declares or converts them)."""
    extra: dict = {}
    if entry.requiresTLS():
        extra["requiretls"] = True
    if isUTF8(entry):
        extra["smtputf8"] = True
    if not report.isascii():
        extra["body"] = "8BITMIME"
    return extra


def isUTF8(entry: QueueEntry) -> bool:
    """The message came with SMTPUTF8 (RFC 6531): its reports are RFC 6533 ones."""
    return bool(entry.extra.get("smtputf8"))


class _EightBitGenerator(email.generator.BytesGenerator):
    """Writes a message/* part given as text with its 8-bit octets (the stock
    generator allows only ASCII there); such text has CRLF lines already."""

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def _eightBit(text: str) -> str:
    """UTF-8 text as the generator writes back unchanged (surrogateescape, as below)."""
    return text.encode("utf-8").decode("ascii", "surrogateescape")


class Reports:
    """Queues the DSNs of the relay runner and of local delivery, to the sender from <>."""

    def __init__(self, queue, hostname: str, sign) -> None:
        """@param queue: L{twistmail.relay.queue.RelayQueue}.
        @param sign: C{sign(message) -> Deferred[bytes]} (DKIM, off the reactor)."""
        self.queue = queue
        self.hostname = hostname
        self.sign = sign

    @defer.inlineCallbacks
    def report(self, entry: QueueEntry, listed: list[Recipient], now: float, action: str,
               expired: set[str] = frozenset(), original=None):
        """Queue a report about C{listed} recipients of C{entry}, unless the sender is <>
        or (for failures) they said NOTIFY=NEVER or left FAILURE out (RFC 3461 §4.1).

        @param original: C{f() -> (headers, whole message or None)}, blocking; by default
            the queued message's files are read.
        """
        if action == FAILED:
            request = ofEntry(entry)
            silent = [r for r in listed if not request.notifies(r.address, "FAILURE")]
            if silent:
                log.info("relay id={id} failed to={to}; no bounce: NOTIFY without FAILURE",
                         id=entry.id, to=",".join(loggable(r.address) for r in silent))
            listed = [r for r in listed if r not in silent]
            if not listed:
                return
        addresses = ",".join(loggable(r.address) for r in listed)
        if not entry.sender:
            # RFC 5321 §4.5.5: never a notification about a notification.
            log.info("relay id={id} {action} to={to}; no report: null sender", id=entry.id,
                     action=action, to=addresses)
            return
        if original is None:
            headers = yield self.queue.headers(entry.id)
            message = yield self.queue.message(entry.id) if ofEntry(entry).ret == "FULL" \
                and entry.size <= FULL_LIMIT and not entry.requiresTLS() else None
        else:
            headers, message = yield self.queue.run(original)
        report = yield self.sign(buildBounce(entry, listed, headers, self.hostname, now,
                                             expired, action, message))
        queued = yield self.queue.enqueue("", [entry.sender], lambda: [report], origin="bounce",
                                          extra=reportExtra(entry, report))
        log.info("relay id={id} bounce id={bounce} to=<{sender}> for={to} reason={reason}",
                 id=entry.id, bounce=queued.id, sender=loggable(entry.sender), to=addresses,
                 reason="expired" if expired else action)
