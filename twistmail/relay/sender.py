# -*- test-case-name: tests.test_relay_sender -*-
"""One outbound SMTP transaction, on Twisted's ESMTP client.

``RelaySender.send`` delivers one message to the recipients of one domain:
it tries the hosts it is given in order (each of their addresses, IPv6 and
IPv4) until one of them takes part in a transaction, and reports a result
per recipient.  What this module changes in ``twisted.mail.smtp``'s
``ESMTPSender``:

* **Results per recipient** instead of one Deferred for the message: the
  RCPT reply for refused recipients, the reply after DATA for the others.
* **Envelope addresses as queued**: Twisted's address parser would requote
  them.
* **Data as stored**: the queue holds canonical CRLF lines, so only
  dot-stuffing is done (RFC 5321 §4.5.2); Twisted's own transform would turn
  CRLF into CRCRLF and misses dots at chunk boundaries.
* **Pipelining** (RFC 2920), which Twisted's client lacks: when the server
  offers it, MAIL, the RCPTs and DATA go in one write and each reply is
  matched to its command in order; the message and its final ``.`` go in
  another (a message of up to one 16 KiB read written at once).
* **Which failures move on to the next host**: anything before MAIL FROM
  (no connection, a 4xx/5xx greeting, a TLS or AUTH problem).  Once MAIL has
  been sent the outcome is final for this attempt, so a message is never sent
  to two hosts at once (RFC 5321 §4.5.4.1).

STARTTLS is opportunistic towards MX hosts (no certificate check, as Postfix's
``smtp_tls_security_level = may``; a failed handshake is retried once in
plaintext); towards a smarthost it may be required and verified.  A hop that
carries an MTA-STS policy (RFC 8461 §5) is tried with verified TLS for its
host name first: under ``mode: enforce`` nothing less is accepted (the
recipients are deferred), under ``mode: testing`` a failure is reported and
delivery falls back to the opportunistic ladder.  Each verified attempt's
outcome goes to ``tlsReport`` (RFC 8460) when one is given.  A smarthost may
also be reached over implicit TLS (SMTPS, RFC 8314 §3), verified, from the
first byte.

REQUIRETLS (RFC 8689 §4.2.1): a message whose sender asked for it (and whose
reverse-path is not ``<>``) goes only over TLS verified for the host's name, to
a host that offers REQUIRETLS after STARTTLS, with the parameter passed on.  A
host named by MX records must be vouched for by an MTA-STS policy in enforce
mode: we do not validate DNSSEC, so an MX answer alone never is.  A host that
falls short is QUIT and the next one tried; when none will do, the recipients
fail (5.7.10, or 5.7.30 when REQUIRETLS was not offered) and the sender gets a
report; nothing is ever sent in clear text.  A report about such a message
(``<>``) passes REQUIRETLS on where it is offered, and is sent anyway where it
is not (RFC 8689 §5).  A message that says ``TLS-Required: No`` (RFC 8689 §3),
like a TLS report, is delivered without its domain's MTA-STS policy; a
smarthost's configured TLS still applies.

Connection reuse (Postfix's connection cache): after a transaction the client
parks the connection in a
``ConnectionCache`` keyed by (host, address, port, TLS level, SASL user), so a
connection is only ever reused for a message that needs the same TLS level and
verification (never a plaintext or unverified one under an MTA-STS enforce
policy).  A parked connection is closed after ``cacheTime`` idle seconds or
``maxPerConnection`` messages.  A reused connection that fails before the final
``.`` of DATA was sent (EOF, timeout, 421) cannot have taken the message: it is
retried at once on a fresh connection.  After that it could have, so it is not.

Pipelining across messages (RFC 2920 §3.1: the message content may be the
first "command" of a group): to a server that offers PIPELINING the
connection is parked as soon as the final ``.`` is written, and the runner
is told (``handOff`` in the context) so the next message for the destination
takes its slot.  That message's MAIL, RCPTs and DATA follow at once, before
the reply to ``.`` comes back: one round trip per message on a busy
connection, not two.  No RSET goes between them: the reply to ``.`` ends the
transaction whatever it says (RFC 5321 §4.1.1.4), so the next MAIL starts a
new one.  The earlier message's result comes with the reply to its ``.``; a
connection lost before that reply defers it as any lost transaction does,
and the later message, which cannot have been taken, is retried on a fresh
connection, as it is after a 421 in reply to the ``.``.  RSET still follows
a transaction without PIPELINING (the connection is parked once it is
accepted), one refused before its data, and a connection's last message
(then QUIT).
"""

from __future__ import annotations

import io
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from twisted.internet import defer, error, ssl, threads
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic

from twistmail import dsn
from twistmail._logtext import loggableText
from twistmail.metrics import Metrics
from twistmail.mtasts import ENFORCE, TESTING
from twistmail.protocols.tcp import sendAtOnce, writeNow
from twistmail.relay import sevenbit, smtputf8
from twistmail.relay.mx import MAX_ADDRESSES, Hop
from twistmail.relay.queue import FAILED, SENT

log = Logger()

#: Result kinds: SENT and FAILED are also the recipient's final state in the queue.
DEFERRED = "deferred"

#: TLS levels of one attempt: verified for the host name, unverified, none.
_VERIFY, _MAY, _NONE = "verify", "may", "none"
#: Verified contexts are per host name; at most this many are kept.
MAX_CONTEXTS = 1000
#: Parked connections at most, over all destinations.
MAX_PARKED = 1000
#: SenderSettings.tls for SMTPS (RFC 8314 §3) to a smarthost.
IMPLICIT = "implicit"

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
#: RFC 8689 §7: "REQUIRETLS support required"; RFC 5248's "Encryption Needed".
NO_REQUIRETLS, ENCRYPTION_NEEDED = "5.7.30", "5.7.10"
MAX_REPLY = 500


@dataclass(frozen=True)
class Result:
    """What happened to one recipient."""

    kind: str  # SENT, DEFERRED or FAILED
    reply: str  # "550 5.1.1 text": remote replies as received, our own errors in the same form
    host: str = ""  # the host that replied; "" when no host took part
    remote: bool = True  # the reply came from the remote SMTP server (DSN: "smtp;")
    #: The server offers DSN and was given the sender's NOTIFY (RFC 3461 §5.2): it reports.
    notifies: bool = False

    @property
    def status(self) -> str:
        """The RFC 3463 status code: from the reply, or derived from its class."""
        parts = self.reply.split(None, 2)
        if len(parts) > 1 and _ENHANCED.match(parts[1]):
            return parts[1]
        return f"{self.reply[:1] if self.reply[:1] in '245' else '4'}.0.0"


def fromReply(code: int, text, host: str) -> Result:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())[:MAX_REPLY]
    kind = SENT if 200 <= code < 300 else FAILED if 500 <= code < 600 else DEFERRED
    return Result(kind, f"{code} {text}" if code > 0 else f"451 4.4.2 {text}", host, code > 0)


def ourError(text: str, status: str = "4.4.1", host: str = "") -> Result:
    """A temporary failure we observed ourselves (no connection, timeout, TLS...)."""
    return Result(DEFERRED, f"451 {status} {text}"[:MAX_REPLY], host, remote=False)


def requireTLSFailed(text: str, status: str, host: str = "") -> Result:
    """RFC 8689 §4.2.1: no host could take a REQUIRETLS message securely: it is returned."""
    return Result(FAILED, f"550 {status} REQUIRETLS: {text}"[:MAX_REPLY], host, remote=False)


@dataclass(frozen=True)
class SenderSettings:
    heloName: str
    port: int
    connectTimeout: float
    commandTimeout: float
    tls: str = "opportunistic"  # or "required"
    username: str = ""
    password: str = ""  # never logged
    trustRoot: object = None  # for verified TLS; None is the platform's CAs
    connectionReuse: bool = True
    cacheTime: float = 2.0  # seconds a parked connection waits for the next message
    maxPerConnection: int = 100  # messages over one connection at most


def trustRootFromFile(path: str):
    """The CA certificates in a PEM file as a trust root; None (the system's CAs) for ""."""
    if not path:
        return None
    end = b"-----END CERTIFICATE-----"
    with open(path, "rb") as f:
        blocks = f.read().split(end)
    certificates = [ssl.Certificate.loadPEM(b + end) for b in blocks if b"-----BEGIN" in b]
    if not certificates:
        raise ValueError(f"{path} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


class _Path(smtp.Address):
    """An envelope address sent exactly as queued."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.wire = text  # what is sent: an A-label domain when downgraded (RFC 6531 §3.2)

    def __bytes__(self) -> bytes:
        return self.wire.encode("utf-8")


class _NoRequireTLS(smtp.SMTPClientError):
    """The server did not offer REQUIRETLS after STARTTLS (RFC 8689 §4.2.1): QUIT."""


@dataclass
class _Finishing:
    """A message whose data is sent, waiting for the reply to its "." while the
    connection may already carry the next one (see the module docstring)."""

    result: defer.Deferred
    recipients: list[str]
    addresses: list  # the RCPT replies: (path, code, reply)
    notifies: bool  # the server was given NOTIFY: it reports (RFC 3461)


class _SessionFailure(Exception):
    """The attempt ended without a transaction result."""

    def __init__(self, reason: str, status: str, inTransaction: bool, afterTLS: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.inTransaction = inTransaction  # MAIL FROM was sent: do not try another host
        self.afterTLS = afterTLS  # STARTTLS was under way or done
        self.retryFresh = False  # a reused connection failed before the message was complete


class _RelayClient(smtp.ESMTPSender):
    """ESMTPSender for one transaction with per-recipient results (see the module docstring)."""

    # ESMTPClient's __setattr__ only warns about its deprecated tlsMode, which we never
    # set; it ran for each of the ~50 attribute writes per message.
    __setattr__ = object.__setattr__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._started = False
        self._tail = b"\r\n"  # the message starts at the beginning of a line
        self._idle = None  # the idle timer while parked
        self._pipelining = False  # the server's last EHLO offered PIPELINING
        self._awaiting: deque = deque()  # the pipelined commands whose replies are due
        self._rsetSent = False  # RSET went out with the final "."
        self._finishing: _Finishing | None = None  # its "." sent, its reply due
        self._nextWaits = False  # a message was assigned while replies were due
        self._quitWhenIdle = False
        self._lastError: Exception | None = None  # what sendError dropped the connection for
        self._corked: list[bytes] | None = None  # written while replies are read (dataReceived)

    def connectionMade(self):
        sendAtOnce(self.transport)  # a MAIL written after the "." goes out at once
        super().connectionMade()

    def dataReceived(self, data):
        """What the replies in C{data} make us send goes out at the end, in one send
        (L{writeNow}): a message's data and its "." with the next message's MAIL,
        RCPTs and DATA, not three writes to a buffer the reactor sends a poll later."""
        if self._corked is not None:
            return super().dataReceived(data)
        self._corked = []
        try:
            return super().dataReceived(data)
        finally:
            self._uncork()
            self._corked = None

    def _uncork(self) -> None:
        """Send what was held back (before anything that writes to the transport itself)."""
        if self._corked:
            writeNow(self.transport, b"".join(self._corked))
            self._corked = []

    def _write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        else:
            writeNow(self.transport, data)

    def sendLine(self, line):
        if self.debug:
            self.log.append(b">>> " + line)
        self._write(line + self.delimiter)

    def smtpState_disconnect(self, code, resp):
        self._uncork()  # the QUIT before the close
        super().smtpState_disconnect(code, resp)

    def esmtpState_serverConfig(self, code, resp):
        # After STARTTLS the new EHLO reply decides again (RFC 3207 §4.2).
        self._pipelining = any(line.split(None, 1)[:1] == [b"PIPELINING"]
                               for line in resp.upper().splitlines())
        return super().esmtpState_serverConfig(code, resp)

    def _transaction(self, code, resp) -> None:
        """MAIL, RCPT and DATA: in one write when the server pipelines, else one by one."""
        if not self._pipelining:
            return smtp.ESMTPSender.smtpState_from(self, code, resp)
        self._from = self.getMailFrom()
        self._failresponse = self.smtpTransferFailed  # from the reply to "." on
        if self._from is None:
            return self._disconnectFromServer()
        recipients = list(self.getMailTo())
        # RFC 2920 §3.1: MAIL and RCPT may be pipelined; DATA ends the group.
        commands = [b"MAIL FROM:" + smtp.quoteaddr(self._from)]
        commands += [b"RCPT TO:" + smtp.quoteaddr(r) for r in recipients]
        commands.append(b"DATA")
        self._send(commands)
        # After the replies still due for the message before, if any (nextMessage).
        self._awaiting.extend([(b"MAIL", None)] + [(b"RCPT", r) for r in recipients]
                              + [(b"DATA", None)])
        self._mailReply = None
        self.toAddressesResult, self.successAddresses = [], []
        self._expected = range(0, 1000)  # RFC 2920 §3.1: every reply is checked, in order
        self._okresponse = self._pipelinedReply

    def _send(self, commands: list[bytes]) -> None:
        if self.debug:  # as Twisted's sendLine: a transcript only when debugging
            for command in commands:
                self.log.append(b">>> " + command)
        self._write(b"".join(command + b"\r\n" for command in commands))

    def _pipelinedReply(self, code, resp):
        command, recipient = self._awaiting.popleft()
        if command == b".":
            return self._dotReply(code, resp)
        if code == 421:
            # RFC 5321 §3.8: the server is closing; no further reply will come.
            self._awaiting.clear()
            self._mailReply = (code, resp)
            return self._dataReply(code, resp)
        if command == b"MAIL":
            self._mailReply = (code, resp)
        elif command == b"RCPT":
            self.toAddressesResult.append((recipient, code, resp))
            if code in smtp.SUCCESS:
                self.successAddresses.append(recipient)
        else:
            return self._dataReply(code, resp)

    def _dataReply(self, code, resp):
        mailCode, mailResp = self._mailReply
        if mailCode not in smtp.SUCCESS:
            # The recipients' replies mean nothing: MAIL's reply is everyone's.
            self.toAddressesResult, self.successAddresses = [], []
            code, resp = mailCode, mailResp
        elif self.successAddresses and code == 354:
            return self.smtpState_data(code, resp)
        elif code == 354:
            # RFC 2920 §3.1: DATA accepted though no recipient was: send a lone ".".
            self.sendLine(b".")
            self._okresponse = self.smtpState_msgSent
            return
        self.smtpState_msgSent(code, resp)

    def smtpState_data(self, code, resp):
        """A message that fits in one of FileSender's reads goes out at once, with its end:
        two reactor turns fewer per message than the producer."""
        messageFile = self.getMailData()
        try:
            data = messageFile.read(basic.FileSender.CHUNK_SIZE + 1)
        except OSError as e:
            return self.sendError(e)  # as FileSender's failure would: the connection is dropped
        if len(data) > basic.FileSender.CHUNK_SIZE:
            messageFile.seek(0)
            self._uncork()  # FileSender writes to the transport itself
            return super().smtpState_data(code, resp)
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_msgSent
        self._write(self.transformChunk(data))
        self.finishedFileTransfer(data[-1:])

    def finishedFileTransfer(self, lastsent):
        self.factory.dataSent = True  # from here on the server may take the message
        if not self._pipelining:
            return super().finishedFileTransfer(lastsent)
        dot = b"." if lastsent.endswith(b"\n") else b"\r\n."
        factory = self.factory
        if not factory.park(self):
            # Its last message: RSET may follow the end of the data in the same write
            # (RFC 2920 §3.1); once it is answered the connection QUITs (smtpState_from).
            self._send([dot, b"RSET"])
            self._rsetSent = True
            return
        # Parked now, with "." unanswered: the next message may follow at once.  No RSET:
        # the reply to "." ends the transaction, accepted or not (RFC 5321 §4.1.1.4), and
        # the next MAIL starts a new one.
        self._send([dot])
        self._finishing = _Finishing(factory.result, list(factory.toEmail),
                                     self.toAddressesResult, self._passesNotify())
        factory.sendFinished = True  # this message's result is _finishing's now
        factory.pending = None
        self._awaiting = deque([(b".", None)])
        self._expected = range(0, 1000)
        self._okresponse = self._pipelinedReply
        handOff, factory.handOff = factory.handOff, None
        if handOff is not None:
            handOff()  # last: the next message may be assigned inside this call

    def _dotReply(self, code, resp) -> None:
        """The reply to a parked connection's "." (see finishedFileTransfer)."""
        finishing, self._finishing = self._finishing, None
        finishing.result.callback(self._resultsOf(code, resp, finishing.addresses,
                                                  finishing.recipients, finishing.notifies))
        if code == 421:
            # RFC 5321 §3.8: the server is closing; a message pipelined behind this
            # one cannot have been taken, and is retried on a fresh connection.
            self.factory.unpark()
            self._awaiting.clear()
            return self._disconnectFromServer()
        if self._awaiting:
            return  # the next message's replies follow
        if self._nextWaits:  # assigned while replies were due, and not pipelined
            self._nextWaits = False
            return self._transaction(250, b"")
        if self._quitWhenIdle:
            return self.quit()
        self._idleNow()

    def _idleNow(self) -> None:
        """Nothing to send or await: the cache's idle timer applies."""
        self.setTimeout(None)
        if self._idle is None:
            self._idle = self.factory.clock.callLater(self.factory.settings.cacheTime,
                                                      self.quit)

    def _passesNotify(self) -> bool:
        """Whether the server was given NOTIFY for this message (and so reports)."""
        return False

    def smtpState_msgSent(self, code, resp):
        if self._rsetSent:  # its reply is the next one
            self._rsetSent = False
            if self._from is not None:
                self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult,
                              self.log)
            self.toAddressesResult = []
            self._from = None
            self._expected = smtp.SUCCESS
            self._okresponse = self.smtpState_from
        else:
            super().smtpState_msgSent(code, resp)  # sends RSET (RFC 5321 §4.1.1.5)
        self._failresponse = self._rsetRefused

    def _rsetRefused(self, code, resp):
        self.factory.unpark()
        self.factory.finish(self.factory.pending)
        self._disconnectFromServer()

    def smtpState_from(self, code, resp):
        if self._started:  # RSET accepted after a transaction
            if self.factory.park(self):
                self._idleNow()
                self.factory.finish(self.factory.pending)
                return
            self.factory.finish(self.factory.pending)
        self._transaction(code, resp)

    def nextMessage(self) -> None:
        """Take the factory's new message over this parked connection: at once, also
        while the replies to the message before are due, when it can be pipelined."""
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self._started = False
        self._tail = b"\r\n"
        self.setTimeout(self.factory.timeout)
        if self._awaiting and not self._pipelinable():
            self._nextWaits = True  # what refuses it must not cut the replies due
            return
        self._transaction(250, b"")

    def _pipelinable(self) -> bool:
        """Whether the assigned message may go out before the replies due: False where
        it could be refused before MAIL, which drops the connection."""
        return True

    def quit(self) -> None:
        """Idle too long, or the cache is being emptied: QUIT (once the replies due are in)."""
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self.factory.unpark()
        if self._awaiting:
            self._quitWhenIdle = True
            return
        self.setTimeout(self.factory.timeout)
        self._disconnectFromServer()

    def connectionLost(self, reason):
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._finishing is not None:
            # Its "." went out, its reply did not come: the server may have the message.
            finishing, self._finishing = self._finishing, None
            text, status = _describe(self._lastError or reason.value)
            finishing.result.errback(_SessionFailure(text, status, True,
                                                     self.factory.tlsStarted))
        super().connectionLost(reason)

    def esmtpState_starttls(self, code, resp):
        self.factory.tlsStarted = True
        self._uncork()  # nothing written before the handshake may go out inside it
        return super().esmtpState_starttls(code, resp)

    def getMailFrom(self):
        if self._started:
            return None  # one transaction per connection: QUIT
        self._started = self.factory.started = True
        return _Path(self.factory.fromEmail)

    def getMailTo(self):
        return [_Path(r) for r in self.factory.toEmail]

    def getMailData(self):
        return self.factory.file

    def transformChunk(self, chunk: bytes) -> bytes:
        """Dot-stuff (RFC 5321 §4.5.2), also where a line starts at a chunk boundary."""
        self.resetTimeout()
        stuffed = (self._tail + chunk).replace(b"\r\n.", b"\r\n..")[len(self._tail):]
        self._tail = (self._tail + chunk)[-2:]
        return stuffed

    def sentMail(self, code, resp, numOk, addresses, log):
        if code == 421 and self.factory.reused and not self.factory.dataSent:
            # RFC 5321 §3.8: the server is closing this (reused) connection; try a fresh one.
            self.factory.fail(smtp.SMTPClientError(code, resp))
            return
        results = self._resultsOf(code, resp, addresses, self.factory.toEmail,
                                  self._passesNotify())
        # Reported once RSET is answered (or the connection is gone): by then the connection
        # is parked, ready for the message that waits for this one's slot.
        self.factory.pending = results

    def _resultsOf(self, code, resp, addresses, recipients, notifies: bool) -> dict:
        """{recipient: Result} from the transaction's last reply and the RCPT replies;
        with C{notifies}, the server was given NOTIFY (RFC 3461) and reports itself."""
        host = self.factory.hostname
        if not addresses:  # MAIL FROM was refused: its reply is everyone's
            results = {r: fromReply(code, resp, host) for r in recipients}
        else:
            results = {}
            for address, rcode, rresp in addresses:
                accepted = rcode in smtp.SUCCESS
                results[address.text] = fromReply(code if accepted else rcode,
                                                  resp if accepted else rresp, host)
        if notifies:
            results = {a: replace(r, notifies=True) for a, r in results.items()}
        return results

    def sendError(self, exc):
        self._lastError = exc
        smtp.SMTPClient.sendError(self, exc)  # QUIT or drop the connection
        self.factory.fail(exc)


class _ExtensionsClient(_RelayClient):
    """What the message asked of the next hop, where it offers the extension: DSN
    parameters (RFC 3461 §5.2) and BODY=8BITMIME (RFC 6152), or 7-bit conversion."""

    extensions: frozenset = frozenset()  # of the last EHLO reply (again after STARTTLS)

    def tryTLS(self, code, resp, items):
        self.extensions = frozenset(name.upper() for name in items)
        return super().tryTLS(code, resp, items)

    def sendLine(self, line: bytes) -> None:
        super().sendLine(self.withParameters(line))

    def _transaction(self, code, resp) -> None:
        """RFC 8689 §4.2.1: a REQUIRETLS message goes only to a server that offers it
        (after STARTTLS: this is the last EHLO reply); a report from <> goes anyway."""
        if self.factory.requireTLS and self.factory.fromEmail \
                and b"REQUIRETLS" not in self.extensions:
            return self.sendError(_NoRequireTLS(-1, b"the server does not offer REQUIRETLS"))
        return super()._transaction(code, resp)

    def _send(self, commands: list[bytes]) -> None:
        """Pipelined MAIL/RCPT (L{_RelayClient._send}) carry the parameters too."""
        super()._send([self.withParameters(command) for command in commands])

    def withParameters(self, line: bytes) -> bytes:
        """MAIL FROM / RCPT TO (as Twisted's quoteaddr writes them) with our parameters."""
        request = self.factory.dsn
        if line.startswith(b"MAIL FROM:"):
            if self.factory.body != "7BIT" and b"8BITMIME" in self.extensions:
                line += b" BODY=8BITMIME"  # BINARYMIME too: the relay sends DATA, not BDAT
            if request is not None:
                line += dsn.mailParameters(request, self.extensions)
            if self.factory.requireTLS and b"REQUIRETLS" in self.extensions:
                line += b" REQUIRETLS"  # RFC 8689 §2
        elif line.startswith(b"RCPT TO:<") and request is not None:
            address = line[len(b"RCPT TO:<"):-1].decode("utf-8")
            line += dsn.rcptParameters(request, address, self.extensions)
        return line

    def _passesNotify(self) -> bool:
        return self.factory.dsn is not None and b"DSN" in self.extensions

    def _pipelinable(self) -> bool:
        return not (self.factory.requireTLS and self.factory.fromEmail
                    and b"REQUIRETLS" not in self.extensions)

    def smtpState_data(self, code, resp):
        """RFC 6152 §3: 8-bit mail to a server without 8BITMIME is converted to 7 bit
        (in a thread), or returned (5.6.3) when its headers are 8-bit."""
        if self.factory.body == "7BIT" or b"8BITMIME" in self.extensions:
            return super().smtpState_data(code, resp)

        def converted(data: bytes) -> None:
            self.factory.file = io.BytesIO(data)
            super(_ExtensionsClient, self).smtpState_data(code, resp)

        def refused(failure) -> None:
            failure.trap(sevenbit.NotConvertible)
            reply = f"554 5.6.3 {self.factory.hostname} does not offer 8BITMIME and the " \
                    f"message cannot be converted to 7 bit: {failure.getErrorMessage()}"
            self.factory.finish({r: Result(FAILED, reply, remote=False)
                                 for r in self.factory.toEmail})
            self.transport.abortConnection()  # in DATA: the server drops the message

        threads.deferToThread(sevenbit.to7bit, self.factory.file).addCallbacks(converted, refused)


class _UTF8Client(_ExtensionsClient):
    """A message that came with SMTPUTF8 (L{twistmail.relay.smtputf8}): MAIL carries the
    parameter to a hop that offers it; to one that does not it is downgraded when
    nothing needs SMTPUTF8, and refused with 5.6.7 otherwise, before MAIL (its
    envelope) or before the data (its headers)."""

    def _utf8Offered(self) -> bool:
        return not self.factory.smtputf8 or b"SMTPUTF8" in self.extensions

    def _pipelinable(self) -> bool:
        return self._utf8Offered() and super()._pipelinable()

    def withParameters(self, line: bytes) -> bytes:
        line = super().withParameters(line)
        if line.startswith(b"MAIL FROM:") and self.factory.smtputf8 \
                and b"SMTPUTF8" in self.extensions:
            line += b" SMTPUTF8"
        return line

    def _transaction(self, code, resp) -> None:
        self._downgraded = None
        if not self._utf8Offered() and not self._started:
            self._downgraded = smtputf8.asciiEnvelope(self.factory.fromEmail,
                                                      self.factory.toEmail)
            if self._downgraded is None:
                self._refuseUTF8("an envelope address has a UTF-8 local part")
                return self._disconnectFromServer()
        super()._transaction(code, resp)

    def getMailFrom(self):
        path = super().getMailFrom()
        if path is not None and self._downgraded is not None:
            path.wire = self._downgraded[0]
        return path

    def getMailTo(self):
        """Downgraded, the A-label forms go on the wire; results stay under the queued
        addresses (L{_Path.text})."""
        paths = super().getMailTo()
        if self._downgraded is not None:
            for path, wire in zip(paths, self._downgraded[1], strict=True):
                path.wire = wire
        return paths

    def smtpState_data(self, code, resp):
        if self._utf8Offered():
            return super().smtpState_data(code, resp)

        def checked(ascii: bool) -> None:
            if ascii:
                super(_UTF8Client, self).smtpState_data(code, resp)
            else:
                self._refuseUTF8("the message has UTF-8 header fields")
                self.transport.abortConnection()  # in DATA: the server drops the message

        threads.deferToThread(smtputf8.headersASCII, self.factory.file).addCallbacks(
            checked, self.sendError)

    def _refuseUTF8(self, why: str) -> None:
        reply = smtputf8.refusal(self.factory.hostname, why)
        self.factory.finish({r: Result(FAILED, reply, remote=False) for r in self.factory.toEmail})


class _RelayClientFactory(smtp.ESMTPSenderFactory):
    protocol = _UTF8Client
    noisy = False

    def __init__(self, settings: SenderSettings, hostname: str, sender: str,
                 recipients: Sequence[str], messageFile, context, required: bool,
                 cache: ConnectionCache | None = None, key: tuple = ()) -> None:
        """@param context: TLS client options for STARTTLS, or None for none (also
            for implicit TLS, which the transport does).
        @param required: no transaction without STARTTLS (C{context} then verifies).
        @param cache: where the connection is parked after its transaction, under C{key}.
        """
        self.done = defer.Deferred()
        self.settings = settings
        self.cache, self.key = cache, key
        self.clock = cache.clock if cache is not None else None
        self.messages = 1
        self.reused = False
        self.dataSent = False
        self.pending = None
        super().__init__(
            settings.username.encode() or None, settings.password.encode() or None, "",
            [], messageFile, self.done, retries=0, timeout=settings.commandTimeout,
            contextFactory=context, heloFallback=not required,
            requireAuthentication=bool(settings.username), requireTransportSecurity=required,
            hostname=None)  # with a hostname ESMTPSender would make a verifying context itself
        # Twisted parses these; ours are used as queued (see _RelayClient).
        self.fromEmail = sender
        self.toEmail = list(recipients)
        self.nEmails = len(self.toEmail)
        self.domain = settings.heloName.encode("idna")
        self.hostname = hostname
        self.started = False
        self.tlsStarted = False
        self.dsn: dsn.Request | None = None  # the message's DSN request, passed on
        self.body = "7BIT"  # its MAIL BODY= (RFC 6152, RFC 3030)
        self.requireTLS = False  # its MAIL REQUIRETLS (RFC 8689)
        self.smtputf8 = False  # it came with SMTPUTF8 (RFC 6531)
        self.handOff: Callable[[], None] | None = None  # called once its data is sent

    def _removeDeferred(self, result):
        """Twisted's factory forgets its one result; ours gets one per message, and
        an earlier message's may fire after the next one's was assigned."""
        return result

    def assign(self, sender: str, recipients: Sequence[str], messageFile) -> defer.Deferred:
        """The next message for this (parked) connection; returns its result Deferred."""
        self.done = self.result = defer.Deferred()
        self.sendFinished = False
        self.fromEmail, self.toEmail, self.file = sender, list(recipients), messageFile
        self.nEmails = len(self.toEmail)
        self.started = self.dataSent = False
        self.reused = True
        self.pending = None
        self.messages += 1
        self.client.nextMessage()
        return self.done

    def park(self, client: _RelayClient) -> bool:
        """After RSET: keep the connection if it may carry more and the cache takes it."""
        self.client = client
        return self.cache is not None and self.messages < self.settings.maxPerConnection \
            and self.cache.park(self.key, self)

    def unpark(self) -> None:
        if self.cache is not None:
            self.cache.remove(self.key, self)

    def finish(self, results: dict | None) -> None:
        if results is not None and not self.sendFinished:
            self.sendFinished = True
            self.result.callback(results)

    def fail(self, exc) -> None:
        if self.pending is not None:
            self.finish(self.pending)  # the server acknowledged: RSET's fate does not matter
        if not self.sendFinished:
            self.sendFinished = True
            self.result.errback(exc)

    def _processConnectionError(self, connector, err):
        self.unpark()
        if self.pending is not None:
            self.finish(self.pending)
        super()._processConnectionError(connector, err)


class ConnectionCache:
    """Parked connections by destination (Postfix's ``scache``); at most C{size} of them."""

    def __init__(self, clock, size: int) -> None:
        self.clock = clock
        self.size = size
        self._idle: dict[tuple, list[_RelayClientFactory]] = {}
        self._count = 0

    def park(self, key: tuple, factory: _RelayClientFactory) -> bool:
        if self._count >= self.size:
            return False  # full: this one QUITs
        self._idle.setdefault(key, []).append(factory)
        self._count += 1
        return True

    def take(self, key: tuple) -> _RelayClientFactory | None:
        """The most recently parked connection for C{key} (the least likely to time out)."""
        parked = self._idle.get(key)
        if not parked:
            return None
        factory = parked.pop()
        self._count -= 1
        if not parked:
            del self._idle[key]
        return factory

    def remove(self, key: tuple, factory: _RelayClientFactory) -> None:
        parked = self._idle.get(key)
        if parked and factory in parked:
            parked.remove(factory)
            self._count -= 1
            if not parked:
                del self._idle[key]

    def __len__(self) -> int:
        return self._count

    def takeAll(self) -> list[_RelayClientFactory]:
        everything = [factory for parked in self._idle.values() for factory in parked]
        self._idle.clear()
        self._count = 0
        return everything


def _describe(exc: BaseException) -> tuple[str, str]:
    """(text, RFC 3463 status) for a failed session, in Postfix's words where it has some."""
    if isinstance(exc, error.ConnectionRefusedError):
        return "Connection refused", "4.4.1"
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError)):
        return "Connection timed out", "4.4.1"
    if isinstance(exc, error.ConnectError):
        return exc.osError or str(exc), "4.4.1"
    if isinstance(exc, smtp.SMTPTimeoutError):
        return "timeout waiting for the server's reply", "4.4.2"
    if isinstance(exc, _NoRequireTLS):
        return "the server does not offer REQUIRETLS", NO_REQUIRETLS
    if isinstance(exc, smtp.TLSRequiredError):
        return "the server does not offer STARTTLS, and TLS is required", "4.7.5"
    if isinstance(exc, (smtp.AUTHDeclinedError, smtp.AUTHRequiredError,
                        smtp.AuthenticationError)):
        code = exc.code if isinstance(exc.code, int) and exc.code > 0 else ""
        return f"authentication failed: {code} {_text(exc.resp)}".strip(), "4.7.8"
    if isinstance(exc, smtp.SMTPClientError):
        if isinstance(exc.code, int) and exc.code > 0:
            return f"host refused to talk to me: {exc.code} {_text(exc.resp)}", "4.4.2"
        cause = exc.__cause__ or exc
        return f"lost connection: {_text(getattr(cause, 'resp', None) or str(cause))}", "4.4.2"
    return f"lost connection: {exc}", "4.4.2"


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())[:MAX_REPLY]


class RelaySender:
    """Delivers one message to the recipients of one destination."""

    def __init__(self, reactor, settings: SenderSettings, tlsReport=None,
                 metrics: Metrics | None = None, clock=None) -> None:
        """@param tlsReport: records verified-TLS outcomes per policy domain
            (L{twistmail.relay.tlsrpt.TLSReports}), or None.
        @param metrics: times each L{send}, by its result.
        @param clock: for the idle timers of parked connections; the reactor by default."""
        self._reactor = reactor
        self.settings = settings
        self.tlsReport = tlsReport
        self._contexts: dict[str, object] = {}  # building one costs more than a delivery
        self._latency = (metrics or Metrics()).deliveries
        self._cache = ConnectionCache(clock or reactor, MAX_PARKED) \
            if settings.connectionReuse else None

    def closeIdle(self) -> None:
        """QUIT every parked connection (at shutdown)."""
        for factory in self._cache.takeAll() if self._cache is not None else ():
            factory.client.quit()

    def _context(self, hostname: str, level: str):
        if level == _NONE:
            return None
        key = hostname if level == _VERIFY else ""  # unverified: the same for every host
        if key not in self._contexts:
            if len(self._contexts) >= MAX_CONTEXTS:  # one per verified host name: bounded
                self._contexts.clear()
            self._contexts[key] = ssl.optionsForClientTLS(hostname, trustRoot=self.settings.trustRoot) \
                if key else ssl.CertificateOptions()
        return self._contexts[key]

    def _attempt(self, hostname: str, address: str, sender: str, recipients: Sequence[str],
                 messageFile, level: str, reuse: bool, request=None,
                 body: str = "7BIT", requireTLS: bool = False,
                 utf8: bool = False, handOff: Callable[[], None] | None = None
                 ) -> defer.Deferred:
        settings = self.settings
        key = (hostname, address, settings.port, level, settings.username)
        factory = self._cache.take(key) if reuse and self._cache is not None else None
        if factory is not None:
            factory.dsn, factory.body, factory.requireTLS = request, body, requireTLS
            factory.smtputf8 = utf8
            factory.assign(sender, recipients, messageFile)
        elif settings.tls == IMPLICIT:  # RFC 8314 §3: TLS from the first byte, verified
            factory = _RelayClientFactory(settings, hostname, sender, recipients, messageFile,
                                          None, False, self._cache, key)
            self._reactor.connectSSL(address, settings.port, factory,
                                     self._context(hostname, _VERIFY),
                                     timeout=settings.connectTimeout)
        else:
            factory = _RelayClientFactory(settings, hostname, sender, recipients, messageFile,
                                          self._context(hostname, level), level == _VERIFY,
                                          self._cache, key)
            self._reactor.connectTCP(address, settings.port, factory,
                                     timeout=settings.connectTimeout)
        done = factory.done  # this message's (an earlier one's may still be due)
        factory.dsn = request
        factory.body = body
        factory.requireTLS = requireTLS
        factory.smtputf8 = utf8
        factory.handOff = handOff

        def failed(failure):
            if failure.check(_SessionFailure):
                raise failure.value  # a message whose "." was sent (_RelayClient._finishing)
            exc = failure.value
            cause = exc.__cause__ if isinstance(exc, smtp.SMTPConnectError) and \
                exc.__cause__ is not None else exc
            text, status = _describe(cause)
            failure = _SessionFailure(text, status, factory.started,
                                      factory.tlsStarted or settings.tls == IMPLICIT)
            failure.retryFresh = factory.reused and not factory.dataSent
            raise failure

        return done.addErrback(failed)

    def send(self, hops: Sequence[Hop], sender: str, recipients: Sequence[str],
             openMessage: Callable[[], defer.Deferred], logContext: dict) -> defer.Deferred:
        """@param openMessage: returns a Deferred firing with the message file, opened anew.
        @return: Deferred firing with {recipient: L{Result}}; never fails.
        """
        started = self._reactor.seconds()

        def timed(results: dict) -> dict:
            self._latency.labels(_outcome(results)).observe(self._reactor.seconds() - started)
            return results

        return self._send(hops, sender, recipients, openMessage, logContext).addCallback(timed)

    @defer.inlineCallbacks
    def _send(self, hops: Sequence[Hop], sender: str, recipients: Sequence[str],
              openMessage: Callable[[], defer.Deferred], logContext: dict):
        last = ourError("no host to try")
        tried = 0
        requireTLS = bool(logContext.get("requiretls"))
        enforce = requireTLS and sender != ""  # RFC 8689 §4.2.1; §5: <> is not held back
        for hop in hops:
            # RFC 8460 §5.3: a TLS report must get through the failures it reports
            # (sent as RFC 8689 "TLS-Required: No"): no policy for it, nothing counted.
            # RFC 8689 §4.2.2: so does any message that says "TLS-Required: No".
            mode = None if logContext.get("origin") == "tlsrpt" or \
                logContext.get("tls_optional") else getattr(hop.policy, "mode", None)
            if enforce and hop.viaMX and mode != ENFORCE:
                last = requireTLSFailed(f"MX host {hop.host} is not vouched for by an MTA-STS "
                                        "policy in enforce mode (DNSSEC is not validated)",
                                        ENCRYPTION_NEEDED)
                logAttempt(logContext, hop.host, {r: last for r in recipients})
                continue
            for address in hop.addresses:
                if tried == MAX_ADDRESSES:
                    break
                tried += 1
                level = _VERIFY if enforce or self.settings.tls in ("required", IMPLICIT) or \
                    mode in (ENFORCE, TESTING) else _MAY
                reuse = True
                while True:
                    where = f"{hop.host}[{address}]:{self.settings.port}"
                    messageFile = yield openMessage()
                    try:
                        results = yield self._attempt(hop.host, address, sender, recipients,
                                                      messageFile, level, reuse,
                                                      logContext.get("dsn"),
                                                      logContext.get("body", "7BIT"),
                                                      requireTLS,
                                                      logContext.get("smtputf8", False),
                                                      logContext.get("handOff"))
                    except _SessionFailure as e:
                        failure = e
                    else:
                        if mode in (ENFORCE, TESTING) and level == _VERIFY:
                            self._report(logContext, hop, address, None)
                        logAttempt(logContext, where, results)
                        return results
                    finally:
                        messageFile.close()
                    if failure.retryFresh:
                        # The server cannot have the message: at once, on a new connection.
                        log.info("relay id={id} mx={mx}: reused connection failed ({why}); "
                                 "retrying on a new one", id=logContext.get("id", ""), mx=where,
                                 why=loggableText(failure.reason))
                        reuse = False
                        continue
                    tlsFailed = (failure.afterTLS or failure.status == "4.7.5") \
                        and failure.status != NO_REQUIRETLS  # that was verified TLS
                    reason = failure.reason
                    if mode == ENFORCE and tlsFailed:
                        # RFC 8461 §5.1: no delivery without a valid TLS session to a listed MX.
                        reason = f"MTA-STS policy (enforce) needs verified TLS: {reason}"
                        failure.status = "4.7.5"
                    if enforce and failure.status != "4.4.1" and \
                            (tlsFailed or failure.status == NO_REQUIRETLS):
                        last = requireTLSFailed(f"{where}: {reason}", NO_REQUIRETLS if
                                                failure.status == NO_REQUIRETLS else
                                                ENCRYPTION_NEEDED, hop.host)
                    else:
                        last = ourError(f"connect to {where}: {reason}"
                                        if failure.status == "4.4.1" else f"{where}: {reason}",
                                        failure.status,
                                        hop.host if failure.status != "4.4.1" else "")
                    logAttempt(logContext, where, {r: last for r in recipients})
                    if mode in (ENFORCE, TESTING) and level == _VERIFY and tlsFailed:
                        self._report(logContext, hop, address, failure)
                    if failure.inTransaction:
                        # The host may have the message: never offer it to another now.
                        return {r: last for r in recipients}
                    if last.kind == FAILED:
                        break  # RFC 8689 §4.2.1: QUIT, the next MX; never a weaker session
                    if tlsFailed and level == _VERIFY and mode == TESTING:
                        level = _MAY  # RFC 8461 §5: testing mode reports, then delivers as before
                        continue
                    if failure.afterTLS and level == _MAY:
                        level = _NONE  # opportunistic TLS failed: once more in plaintext
                        continue
                    break
        return {r: last for r in recipients}

    def _report(self, context: dict, hop: Hop, address: str, failure) -> None:
        if self.tlsReport is None:
            return
        if failure is None:
            kind = None
        elif failure.status == "4.7.5" and not failure.afterTLS:
            kind = "starttls-not-supported"  # RFC 8460 §4.3.1
        else:
            kind = "validation-failure"  # RFC 8460 §4.3.2.2: the handshake or chain failed
        self.tlsReport.record(context.get("domain", ""), hop.policy, kind, hop.host, address)


def _outcome(results: dict) -> str:
    """SENT, DEFERRED or FAILED when every recipient had it, else "partial"."""
    kinds = {r.kind for r in results.values()}
    return kinds.pop() if len(kinds) == 1 else "partial"


def logAttempt(context: dict, where: str, results: dict) -> None:
    """One log line per delivery attempt; never the message, never credentials.

    The line after the id is made here, in one f-string: Twisted's formatter
    (string.Formatter, in Python) took a quarter of the line's cost per field, on
    the reactor thread, once per message.  The fields stay in the event for
    observers that read them."""
    shown = next((r for r in results.values() if r.kind != SENT), next(iter(results.values())))
    domain, n, result, reply = context.get("domain", ""), len(results), _outcome(results), \
        loggableText(shown.reply)
    log.info("relay id={id} {line}",
             line=f"domain={domain} mx={where} rcpts={n} result={result} reply={reply}",
             id=context.get("id", ""), domain=domain, mx=where, n=n, result=result,
             reply=reply)
