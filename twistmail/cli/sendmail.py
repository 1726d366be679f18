# -*- test-case-name: tests.test_sendmail -*-
"""``twistmail sendmail``: the ``/usr/sbin/sendmail`` interface for local programs.

Reads a message on stdin and queues it, with the flags cron, mutt, git and
PHP use: ``-t`` (recipients from To/Cc/Bcc, added to those given as
arguments, as Postfix does), ``-f``/``-r SENDER``, ``-i``/``-oi`` (a line
with a single dot is data), ``-F NAME``; ``-o...``, ``-B...``, ``-N...``,
``-bm``, ``-v`` are accepted and ignored.  Like Postfix's cleanup, it removes
Bcc: and adds Received:, and From:, Date: and Message-ID: when missing; then
it DKIM-signs the message when the From domain has keys (``twistmail dkim``).

The message goes into the queue even when the server is not running; a
running server picks it up within ``[relay] pickup_interval`` (see
``twistmail.relay.control``).  Exit status follows sysexits.h.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import time
from collections.abc import Callable
from email.utils import formataddr, formatdate, getaddresses

from twistmail import config as configmod
from twistmail.cli import queue as queuecli
from twistmail.delivery.routing import BadAddress, checkRemoteAddress
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer
from twistmail.errors import StorageError
from twistmail.relay import control
from twistmail.relay.pgqueue import QueueIdTaken
from twistmail.relay.queue import QueueEntry, Recipient, commitLocked, newQueueId, stageNew

EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 64, 65, 75, 78

_HEADER = re.compile(rb"^[!-9;-~]+:")


class SendmailError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def register(sub) -> None:
    p = sub.add_parser("sendmail", help="queue a message from stdin (the /usr/sbin/sendmail "
                       "interface)", description=__doc__.split("\n\n")[1])
    p.add_argument("-t", action="store_true", help="also send to the To, Cc and Bcc addresses")
    p.add_argument("-i", action="store_true", help="a line with a single dot does not end input")
    p.add_argument("-f", "-r", dest="sender", metavar="SENDER", help="envelope sender "
                   "(default: your login name @ [server] hostname; '' or '<>' for none)")
    p.add_argument("-F", dest="fullname", metavar="NAME", help="full name for a missing From:")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTION",
                   help="sendmail options; -oi is -i, others are ignored")
    p.add_argument("-B", "-N", "-O", dest="ignored", action="append", metavar="VALUE",
                   help="ignored")
    p.add_argument("-b", dest="mode", default="m", metavar="MODE", help="only -bm (the default)")
    p.add_argument("-v", action="store_true", help="print the queue id")
    p.add_argument("recipients", nargs="*", metavar="RECIPIENT")


def readMessage(stream, dotEnds: bool, limit: int) -> bytes:
    """The message from C{stream}; without -i a line with a single dot ends it."""
    lines = []
    size = 0
    for line in iter(stream.readline, b""):
        if dotEnds and line.rstrip(b"\r\n") == b".":
            break
        size += len(line)
        if size > limit:
            raise SendmailError(f"the message is larger than [smtp] max_message_size ({limit} "
                                "octets)", EX_DATAERR)
        lines.append(line)
    return b"".join(lines)


def splitHeaders(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """[[header line, continuation lines...], ...] and the body (after the blank line)."""
    headers: list[list[bytes]] = []
    lines = message.splitlines(keepends=True)
    i = 0
    for i, line in enumerate(lines):  # noqa: B007 - i is used after the loop
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1].append(line)
        elif _HEADER.match(line):
            headers.append([line])
        else:
            break
    else:
        i = len(lines)
    rest = lines[i:]
    if rest and not rest[0].strip():
        rest = rest[1:]  # the blank line between header and body
    return headers, b"".join(rest)


def _name(header: list[bytes]) -> str:
    return header[0].split(b":", 1)[0].strip().lower().decode("ascii", "replace")


def _value(header: list[bytes]) -> str:
    text = b"".join(header).split(b":", 1)[1]
    return " ".join(text.decode("utf-8", "replace").split())


def addresses(values: list[str]) -> list[str]:
    return [addr for _, addr in getaddresses(values) if addr]


def headerRecipients(message: bytes) -> list[str]:
    """The addresses in To:, Cc: and Bcc: (for -t)."""
    headers, _ = splitHeaders(message)
    return addresses([_value(h) for h in headers if _name(h) in ("to", "cc", "bcc")])


def prepare(message: bytes, *, sender: str, fullname: str | None, hostname: str, queueId: str,
            now: float) -> bytes:
    """The message as queued: without Bcc:, with our Received: and any missing From/Date/Message-ID."""
    headers, body = splitHeaders(message)
    names = {_name(h) for h in headers}
    headers = [h for h in headers if _name(h) != "bcc"]
    user = f"{getpass.getuser()} (uid {os.getuid()})"
    added = [f"Received: by {hostname} (twistmail sendmail, from {user})\n"
             f"\tid {queueId}; {formatdate(now, localtime=True)}\n"]
    if "from" not in names:
        added.append(f"From: {formataddr((fullname or '', sender or f'MAILER-DAEMON@{hostname}'))}\n")
    if "date" not in names:
        added.append(f"Date: {formatdate(now, localtime=True)}\n")
    if "message-id" not in names:
        added.append(f"Message-ID: <{queueId}@{hostname}>\n")
    head = "".join(added).encode() + b"".join(b"".join(h) for h in headers)
    if not head.endswith(b"\n"):
        head += b"\n"
    return head + b"\n" + body


def needsSMTPUTF8(message: bytes, sender: str, recipients: list[str]) -> bool:
    """Whether an address or a header field is UTF-8: the message is queued flagged
    SMTPUTF8 (RFC 6531), as Postfix's sendmail flags it (``-XU`` or autodetection)."""
    headers, _ = splitHeaders(message)
    return not (sender.isascii() and all(r.isascii() for r in recipients)
                and all(b"".join(h).isascii() for h in headers))


def queueMessage(config: configmod.Config, build: Callable[[str], bytes], sender: str,
                 recipients: list[str], now: float, extra: dict | None = None) -> str:
    """Commit the message C{build(queueId)} returns to the queue and tell the server.

    Durable when this returns.  @return: the queue id.
    """
    if config["relay"]["queue"] == "postgresql":
        return _queueShared(config, build, sender, recipients, now)
    queueDir = os.path.join(config.dataDir, "queue")
    for _ in range(10):
        queueId = newQueueId(now)
        entry = QueueEntry(id=queueId, sender=sender, recipients=[Recipient(r) for r in recipients],
                           created=now, origin="sendmail", client=getpass.getuser(),
                           extra=dict(extra or {}))
        data = build(queueId)
        try:
            os.makedirs(control.controlDir(queueDir), mode=0o700, exist_ok=True)
            lock = os.path.join(queueDir, ".lock")  # the server must be able to take it too
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600))
            # Announced first: a sendmail killed after the commit is still picked up.
            request = control.writeRequest(queueDir, queueId, "new")
        except OSError as e:
            raise SendmailError(f"cannot write to {queueDir}: {e.strerror}. Run sendmail as the "
                                "server's user (or root), or check --config/--data-dir",
                                EX_TEMPFAIL) from None

        def stage(entry=entry, data=data):
            return stageNew(queueDir, entry, lambda: [data])

        [result] = commitLocked(queueDir, [stage])
        if not isinstance(result, Exception):
            return queueId
        os.unlink(request)
        if not isinstance(result.__cause__, FileExistsError):
            raise SendmailError(f"cannot queue the message: {result}", EX_TEMPFAIL)
    raise SendmailError("cannot find a free queue id", EX_TEMPFAIL)


def _queueShared(config: configmod.Config, build: Callable[[str], bytes], sender: str,
                 recipients: list[str], now: float) -> str:
    """Into the queue in PostgreSQL: every node polls it, so no server needs telling."""
    try:
        queue = queuecli.openQueue(config)
    except configmod.ConfigError as e:
        raise SendmailError(str(e), EX_TEMPFAIL) from None
    for _ in range(10):
        queueId = newQueueId(now)
        data = build(queueId)
        try:
            queuecli.now(queue.enqueue(sender, recipients, lambda data=data: [data], origin="sendmail",
                                 id=queueId, client=getpass.getuser()))
            return queueId
        except QueueIdTaken:
            continue
        except StorageError as e:
            raise SendmailError(f"cannot queue the message: {e}", EX_TEMPFAIL) from None
    raise SendmailError("cannot find a free queue id", EX_TEMPFAIL)


def run(args, config: configmod.Config, stdin=None) -> str:
    if args.mode != "m":
        raise SendmailError(f"-b{args.mode} is not supported; only -bm (send mail)", EX_USAGE)
    dotEnds = not (args.i or "i" in args.options)
    sender = args.sender if args.sender is not None else f"{getpass.getuser()}@{config.hostname}"
    sender = sender.strip().removeprefix("<").removesuffix(">")
    if sender and "@" not in sender:
        sender = f"{sender}@{config.hostname}"
    recipients = []
    for arg in args.recipients:
        # "Name <addr>" and lists are parsed; a plain address is taken as written.
        found = addresses([arg]) if "<" in arg or "," in arg else [arg.strip()]
        if not found or not all(found):
            raise SendmailError(f"{arg!r} is not a mail address", EX_DATAERR)
        recipients += found
    if not recipients and not args.t:
        raise SendmailError("no recipients: give them as arguments, or use -t", EX_USAGE)
    data = readMessage(stdin if stdin is not None else sys.stdin.buffer, dotEnds,
                       config["smtp"]["max_message_size"])
    now = time.time()
    signer = Signer(KeyRing(config.dataDir))

    def build(queueId: str) -> bytes:
        # Signed last, over the headers prepare added (From, Date, Message-ID).
        return signer.sign(prepare(data, sender=sender, fullname=args.fullname,
                                   hostname=config.hostname, queueId=queueId, now=now))

    if args.t:
        recipients = list(dict.fromkeys(recipients + headerRecipients(data)))
    if not recipients:
        raise SendmailError("no recipients in the arguments or in To:, Cc:, Bcc:", EX_USAGE)
    canonical = []
    for rcpt in recipients:
        if "@" not in rcpt:
            rcpt = f"{rcpt}@{config.hostname}"  # as Postfix's myorigin
        try:
            canonical.append(checkRemoteAddress(rcpt))
        except BadAddress:
            raise SendmailError(f"{rcpt!r} is not a mail address", EX_DATAERR) from None
    if sender:
        try:
            checkRemoteAddress(sender)
        except BadAddress:
            raise SendmailError(f"sender {sender!r} is not a mail address (use -f)",
                                EX_DATAERR) from None
    try:
        queueId = queueMessage(config, build, sender, list(dict.fromkeys(canonical)), now,
                               {"smtputf8": True} if needsSMTPUTF8(data, sender, canonical) else None)
    except StorageError as e:
        raise SendmailError(f"cannot queue the message: {e}", EX_TEMPFAIL) from None
    return f"queued as {queueId}" if args.v else ""
