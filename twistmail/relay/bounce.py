# -*- test-case-name: tests.test_relay_bounce -*-
"""Delivery status notifications (bounces): RFC 3464 multipart/report.

A bounce goes to the original sender from the null reverse-path ``<>``
(RFC 5321 §4.5.5, so a bounce can never bounce back), lists the failed
recipients with the remote server's reply and carries the original message's
header section (``text/rfc822-headers``), not its body.
"""

from __future__ import annotations

import email.policy
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

from twistmail.relay.queue import QueueEntry, Recipient

#: RFC 3463 X.4.7: delivery time expired.
EXPIRED = "4.4.7"


def _status(recipient: Recipient, expired: bool) -> str:
    parts = recipient.last_reply.split(None, 2)
    status = parts[1] if len(parts) > 1 and parts[1][:1] in "245" and parts[1].count(".") == 2 \
        else f"{recipient.last_reply[:1] or '5'}.0.0"
    return EXPIRED if expired and status.startswith("4") else status


def _block(fields: list[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in fields:
        block[name] = value
    return block


def buildBounce(entry: QueueEntry, failed: list[Recipient], headers: bytes, hostname: str,
                now: float, expired: set[str] = frozenset()) -> bytes:
    """The DSN for C{failed} recipients of C{entry}, as the bytes to queue (CRLF lines).

    @param headers: the original message's header section.
    @param expired: addresses that failed because the queue lifetime ran out.
    """
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{entry.sender}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = formatdate(now, localtime=True)
    report["Message-ID"] = make_msgid("bounce", domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no auto-replies to this

    lines = [f"This is the mail system at host {hostname}.", "",
             "Your message could not be delivered to one or more recipients.",
             "The reasons the remote servers or this server gave are below.", ""]
    for r in failed:
        why = "gave up after the maximum time in the queue; last error: " \
            if r.address in expired else ""
        lines.append(f"<{r.address}>: {why}{r.last_reply}")
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "us-ascii"
                           if all(line.isascii() for line in lines) else "utf-8"))

    status = Message()
    status["Content-Type"] = "message/delivery-status"
    blocks = [_block([("Reporting-MTA", f"dns; {hostname}"),
                      ("X-Twistmail-Queue-ID", entry.id),
                      ("Arrival-Date", formatdate(entry.created, localtime=True))])]
    for r in failed:
        fields = [("Final-Recipient", f"rfc822; {r.address}"), ("Action", "failed"),
                  ("Status", _status(r, r.address in expired))]
        if r.remote_host:
            fields.append(("Remote-MTA", f"dns; {r.remote_host}"))
        kind = "smtp" if r.remote_host else "X-Twistmail"
        fields.append(("Diagnostic-Code", f"{kind}; {r.last_reply}"))
        if r.last_attempt is not None:
            fields.append(("Last-Attempt-Date", formatdate(r.last_attempt, localtime=True)))
        blocks.append(_block(fields))
    status.set_payload(blocks)
    report.attach(status)

    original = Message()
    original["Content-Type"] = "text/rfc822-headers"
    # surrogateescape: the generator writes the original octets back unchanged.
    text = headers.decode("ascii", "surrogateescape")
    if not headers.isascii():
        original["Content-Transfer-Encoding"] = "8bit"
    original.set_payload(text.replace("\r\n", "\n"))
    report.attach(original)
    return report.as_bytes(policy=email.policy.SMTP)
