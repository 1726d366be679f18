# -*- test-case-name: tests.test_smtp -*-
"""Inbound SMTP (MX role) on Twisted's ESMTP server.

What this subclass changes in ``twisted.mail.smtp.ESMTP`` and why:

* **Framing** (``dataReceived``).  Twisted dispatches every buffered line at
  once, so a pipelined RCPT would be handled before an asynchronous MAIL
  finished.  We hand Twisted one command at a time and wait for its reply
  before the next (RFC 2920 §3.1: replies in order).  Command lines are bounded.
* **DATA** is scanned in bulk for CRLF.CRLF instead of line by line: only
  ``<CRLF>.<CRLF>`` ends the message (RFC 5321 §4.1.1.4), so bare LF or CR
  around a dot can never end DATA (SMTP smuggling, CVE-2023-51764 class).
  The size limit is enforced while streaming; over-size data is discarded as
  it arrives, never buffered.
* **BDAT** (RFC 3030 CHUNKING, L{twistmail.protocols.bdat}): counted chunks are
  spooled as they arrive under the same size limit; a refused chunk is answered
  when announced and its octets are dropped as they come.  ``LAST`` ends the
  message through the same end-of-DATA path (filters, hop count, fsync before 250).
* **DSN** (RFC 3461, L{twistmail.dsn}): RET/ENVID on MAIL and NOTIFY/ORCPT on
  RCPT are checked (501 5.5.4) and travel with the envelope into the queue.
* **REQUIRETLS** (RFC 8689): offered only once the session is under TLS, and
  ``MAIL ... REQUIRETLS`` in clear text is refused (530 5.7.10); the flag travels
  with the envelope and the relay enforces it (L{twistmail.relay.sender}).
* **SMTPUTF8** (RFC 6531, L{twistmail.eai}): with MAIL's SMTPUTF8 parameter a path may
  be UTF-8 (strict, NFC, IDNA 2008 domains); without it an 8-bit path gets 553 5.6.7
  (RFC 6531 §3.5).  Twisted's Address and command patterns know only ASCII atoms,
  so the 8-bit case is parsed here (L{_UTF8Address}).
* **One spool per transaction** shared by all recipients, with one
  ``Received:`` header (RFC 5321 §4.4), instead of one IMessage per recipient.
* **Enhanced status codes** (RFC 2034/3463) on every final reply.
* **Flow control** (L{flow.Flow}): no command is started while the client
  leaves our replies unread, and reading stops when more than
  L{flow.MAX_BACKLOG} octets of commands wait; message data is spooled as it
  comes, so only commands count.  Closing aborts a client that does not read.
  A line must be complete within the timeout of its first octet (the
  per-record deadline of L{flow.Flow.received}), however often bytes come.
* **Policy is not here**: routing, sender ownership, rate limits, loop
  detection, the filters and delivery belong to the transaction
  (L{twistmail.delivery.transaction.Session}), called at connect, HELO, MAIL,
  RCPT and the end of DATA; RSET, HELO/EHLO, STARTTLS and a lost connection
  tell it the transaction ended (releasing rate-limit reservations).
* **Not SMTP** (L{_notSMTP}): an HTTP request line or a header-shaped line
  outside DATA ends the session before anything pipelined behind it is read,
  so a web page's form posted to port 25 cannot deliver the SMTP in its body.

Line endings: the message is stored exactly as received after dot-unstuffing,
CRLF included.  Bare CR or LF inside the data are kept as they are.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re

from twisted.cred import error as credError
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import imap4, smtp
from twisted.mail.smtp import AUTH, COMMAND, DATA

from twistmail import dsn
from twistmail._logtext import loggable
from twistmail.auth.checkers import fromClient
from twistmail.delivery.routing import Client, Router
from twistmail.delivery.spool import MessageSource
from twistmail.delivery.transaction import Session, SMTPPolicy
from twistmail.eai import AddressError, canonicalAddress, decodePath
from twistmail.errors import AccountsUnavailable
from twistmail.filters.chain import ConfiguredFilter
from twistmail.interfaces import IMailAccount
from twistmail.metrics import Metrics
from twistmail.model import ACCEPT, DISCARD, QUARANTINE, Envelope, Verdict
from twistmail.protocols.bdat import ChunkReader, parseArguments
from twistmail.protocols.flow import MAX_BACKLOG, Flow
from twistmail.protocols.limits import ConnectionLimiter, admit
from twistmail.protocols.security import Security, isSecure, listenerHost
from twistmail.protocols.tcp import sendAtOnce
from twistmail.ratelimit import SendLimits

log = Logger()

# RFC 3463 defaults for replies that do not carry their own enhanced code.
_ENHANCED = {
    (250, "MAIL"): b"2.1.0", (250, "RCPT"): b"2.1.5", (250, "."): b"2.0.0",
    (221, None): b"2.0.0", (250, None): b"2.0.0", (235, None): b"2.7.0",
    (421, None): b"4.4.2", (451, None): b"4.3.0", (452, None): b"4.5.3", (454, None): b"4.7.0",
    (500, None): b"5.5.2", (501, None): b"5.5.4", (502, None): b"5.5.1", (503, None): b"5.5.1",
    (504, None): b"5.5.4", (535, None): b"5.7.8", (550, None): b"5.1.1", (552, None): b"5.3.4",
    (553, None): b"5.1.3", (554, None): b"5.6.0", (555, None): b"5.5.4",
}
_HAS_ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3}( |$)")
#: The status codes a rejection is counted under: RFC 3463 classes 4 and 5, subjects 0-7;
#: at most 1,600 label values, whatever a reply says ("other" for the rest).
_STATUS_LABEL = re.compile(rb"^([45]\.[0-7]\.\d{1,2})(?: |$)")
_NO_ENHANCED_FOR = {"EHLO", "HELO", "GREETING"}  # RFC 2034 §3: not for greeting/EHLO/HELO
#: RFC 5321 §4.1.2: a path is printable ASCII (qtextSMTP is %d32-126 but for " and \);
#: 8-bit needs SMTPUTF8 (RFC 6531).  Twisted's Address takes any byte inside quotes,
#: and str() of such an address raises later.
_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")
_NO_UTF8 = b"5.6.7 Non-ASCII address needs MAIL's SMTPUTF8 parameter (RFC 6531 section 3.4)"
#: Twisted's path pattern with UTF-8 octets allowed in atoms (RFC 6531 §3.3 atext).
_ATOM8 = rb"[-A-Za-z0-9!\#$%&'*+/=?^_`{|}~\x80-\xff]"
_QSTRING8 = rb'("[^"]*"|\\.|' + _ATOM8 + rb"|[@.,:])+"
#: Like Postfix's smtpd_hard_error_limit: a client that keeps erring is cut off.
MAX_ERRORS = 20
#: Not SMTP but another protocol spoken to our port (a browser's form POST carries
#: SMTP commands in its body): the session ends at once, as with Postfix's
#: smtpd_forbidden_commands = CONNECT GET POST.  Every RFC 9110 §9 method and PATCH.
_FORBIDDEN_VERBS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT",
                              b"OPTIONS", b"TRACE", b"PATCH"})
#: A header field ("Host:", "User-Agent:"): an RFC 5322 §3.6.8 field name and its colon
#: in the first word (Postfix's is_header check).  No SMTP verb has a colon.
_HEADER_SHAPED = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")


class _PLAIN(imap4.PLAINCredentials):
    """RFC 4616 PLAIN; an authorization identity other than one's own is refused."""

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            raise ValueError("malformed PLAIN response, or acting as another user")
        _, self.username, self.password = parts


#: SASL mechanisms offered where AUTH is (RFC 4954): PLAIN and the older LOGIN.
CHALLENGERS = {b"PLAIN": _PLAIN, b"LOGIN": smtp.LOGINCredentials}


class _UTF8Address(smtp.Address):
    """An RFC 6531 path: UTF-8 atoms, and text as UTF-8 (Twisted's is ASCII)."""

    tstring = re.compile(rb"""((?:"[^"]*"|\\.|""" + _ATOM8 + rb""")+|.)""")
    atomre = re.compile(_ATOM8)

    def __str__(self) -> str:
        return bytes(self).decode("utf-8")


def _pathProblem(path: bytes, utf8: bool) -> bytes | None:
    """Why an 8-bit C{path} is refused (enhanced code and text), or None if it is
    printable ASCII or, in an SMTPUTF8 transaction, a usable UTF-8 address."""
    if not _UNPRINTABLE.search(path):
        return None
    try:
        address = decodePath(path).strip("<>")
    except AddressError as e:
        return str(e).encode()
    if not utf8:
        return _NO_UTF8
    try:
        canonicalAddress(address.rpartition(":")[2])  # after a source route
    except AddressError as e:
        return str(e).encode("utf-8")
    return None


class SMTPServer(smtp.ESMTP):
    """One inbound SMTP connection; configuration comes from the factory."""

    _declaredSize: int | None = None  # MAIL SIZE=, for RCPT's quota check
    mail_re = re.compile(rb"\s*FROM:\s*(?P<path><>|<" + _QSTRING8 + rb">|" + _QSTRING8
                         + rb")\s*(\s(?P<opts>.*))?$", re.I)
    rcpt_re = re.compile(rb"\s*TO:\s*(?P<path><" + _QSTRING8 + rb">|" + _QSTRING8
                         + rb")\s*(\s(?P<opts>.*))?$", re.I)

    def __init__(self) -> None:
        super().__init__()
        self._buf = b""
        self._waiting = False  # a command was dispatched and has not been answered
        self._processing = False
        self._discardLine = False
        self._command: str | None = None
        self._source: MessageSource | None = None
        self._dataError: tuple[int, bytes] | None = None
        self._midLine = False
        self._envelope: Envelope | None = None
        self._usedEhlo = False
        self._errors = 0
        self._flow: Flow | None = None
        self._session: Session | None = None
        #: A filter refused the session at connect with 554: only QUIT is served.
        self._refused = False
        self._lost = False
        #: A filter refused the last HELO/EHLO: no MAIL until one is accepted.
        self._heloRefused = False
        #: The DSN request (RFC 3461) and BODY= type of the transaction; MAIL's until accepted.
        self._dsn = dsn.Request()
        self._body = "7BIT"
        self._mailParams: tuple[dsn.Request, str, bool] | None = None
        self._smtputf8 = False  # MAIL's SMTPUTF8 (RFC 6531)
        #: MAIL's REQUIRETLS (RFC 8689): of the transaction, and of the MAIL being checked.
        self._requireTLS = self._askedTLS = False
        self._rcptParams: tuple[list[str] | None, str | None] = (None, None)
        #: The BDAT chunk being read (RFC 3030), and the message of a BDAT transaction.
        self._chunk: ChunkReader | None = None
        self._bdat: MessageSource | None = None
        #: What relay permission depends on; SMTP AUTH sets ``authenticated``.
        self.client = Client()

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)
        self.host = self.factory.hostname
        self.timeout = self.factory.config["timeout"]
        self.peerHost = getattr(self.transport.getPeer(), "host", "unknown")
        self.client = Client(address=self.peerHost)
        self.secure = isSecure(self.transport)
        self.ctx = self.factory.security.tls
        if self.factory.offersAuth:
            self.challengers = CHALLENGERS
        self._flow = Flow(self.transport, lambda: self.timeout, drained=self._resume,
                          activity=self.resetTimeout, clock=self, expired=self.timeoutConnection,
                          name="smtp")
        self._session = self.factory.policy.session(self.peerHost)
        if self.secure:
            self._session.startedTLS()
        self._waiting = True  # nothing is read as a command before the greeting
        self._session.connect().addCallback(self._greet)

    def _greet(self, verdict: Verdict) -> None:
        """RFC 5321 §3.1: 220, or 554 and then only QUIT, or 421 and close."""
        if self._lost or self.transport.disconnecting:
            return
        self._command = "GREETING"
        if verdict.action in (ACCEPT, QUARANTINE, DISCARD):
            super().connectionMade()
        elif verdict.code >= 500:
            self._refused = True
            self._helo = (None, self.peerHost.encode("idna"))
            self.sendCode(554, self.host + b" " + verdict.text.encode("utf-8", "replace"))
            self.setTimeout(self.timeout)
        else:
            self.sendCode(421, self.host + b" " + verdict.text.encode("utf-8", "replace"))
            self.closeConnection()
            return
        self._command = None
        self._waiting = False
        if self._buf and not self._processing:
            self._process()

    def greeting(self) -> bytes:
        return self.host + b" ESMTP twistmail"

    def extensions(self) -> dict:
        ext = super().extensions()
        if self.secure:
            ext.pop(b"STARTTLS", None)
        if not ext.get(b"AUTH") or self.authenticated or not self._passwordsAllowed():
            ext.pop(b"AUTH", None)  # RFC 4954 §4: only where a password may be sent
        ext[b"PIPELINING"] = None
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        ext[b"DSN"] = None  # RFC 3461
        ext[b"CHUNKING"] = None  # RFC 3030
        ext[b"BINARYMIME"] = None
        ext[b"SMTPUTF8"] = None  # RFC 6531
        if self.secure:
            ext[b"REQUIRETLS"] = None  # RFC 8689 §2: only usable in a TLS session
        ext.pop(b"SIZE", None)  # last, as before: tests and scripts look for "250 SIZE"
        ext[b"SIZE"] = [str(self.factory.config["max_message_size"]).encode()]
        return ext

    def connectionLost(self, reason) -> None:
        self._lost = True
        if self._session is not None:
            self._session.reset()
        if self.mode is DATA and self._source is not None:
            self._source.discard()
            self._session.aborted(self._envelope, self._source.size)
            self._source = None
        if self._bdat is not None:
            self._bdat.discard()
            self._session.aborted(self._envelope, self._bdat.size)
            self._bdat = None
        if self._flow is not None:
            self._flow.lost()
        super().connectionLost(reason)

    def closeConnection(self) -> None:
        """Close once the client has read our last replies, or abort if it has not
        within the idle timeout: C{loseConnection} alone would wait forever."""
        self._flow.close(self.timeout)

    def timeoutConnection(self) -> None:
        """Idle too long, or a line not completed in time (L{Flow.received}): a client
        that has not read our replies either is aborted."""
        self.setTimeout(None)
        self._buf = b""  # nothing more is read as a command
        self.sendCode(421, self.host + b" Timeout. Try talking faster next time!")
        self._flow.close(self.timeout, abort=self._flow.outputFull)

    # -- framing: one command at a time ----------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._flow.received(data)
        self._buf += data
        self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            # No new command while the client leaves our replies unread; message
            # data is still spooled (it is answered only at its end).
            while self._buf and not self._waiting and not self.transport.disconnecting \
                    and (self.mode is DATA or self._chunk is not None
                         or not self._flow.outputFull):
                if self._chunk is not None:
                    self._buf = self._chunk.feed(self._buf)
                    if not self._chunk.done:
                        break
                    self._chunkRead()
                elif self.mode is DATA:
                    if not self._consumeData():
                        break
                elif not self._consumeLine():
                    break
        finally:
            self._processing = False
            self._flow.backlog(len(self._buf) > MAX_BACKLOG)

    def _resume(self) -> None:
        """The client has read our replies: go on with the commands it sent meanwhile."""
        if not self._processing and not self._waiting:
            self._process()

    def _consumeLine(self) -> bool:
        maxLine = self.factory.config["max_line_length"]
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > maxLine:
                # Discard now so a client streaming an endless line cannot fill memory.
                self._buf = b""
                if not self._discardLine:
                    self._discardLine = True
                    self._command = None
                    self.sendCode(500, b"5.5.2 Line too long")
            return False
        line, self._buf = self._buf[:end], self._buf[end + 1:]
        if self._discardLine:
            self._discardLine = False
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > maxLine:
            self._command = None
            self.sendCode(500, b"5.5.2 Line too long")
            return True
        if self.mode == COMMAND and _notSMTP(line):
            self._refuseOtherProtocol(line)
            return False
        self._waiting = True
        self._command = "AUTH-RESPONSE" if self.mode != COMMAND else \
            line.split(None, 1)[0].upper().decode("ascii", "replace") if line.strip() else ""
        try:
            self.lineReceived(line)
        except Exception:
            # A bug or an environment failure (spool directory unwritable...): answer
            # rather than let Twisted drop the connection with nothing said.  The
            # line itself is not logged: it may be an AUTH response.
            log.failure("smtp client={client} command {command} failed", client=self.peerHost,
                        command=self._command if self.mode != AUTH else "AUTH")
            self.mode = COMMAND
            self._from, self._to = None, []
            self._session.reset()
            if self._source is not None:
                self._source.discard()
                self._source = None
            self._endChunking()
            self._chunk = None
            if self._waiting:
                self.sendCode(451, b"4.3.0 Local error in processing, try again later")
        return True

    def _refuseOtherProtocol(self, line: bytes) -> None:
        """An HTTP request line or header: nothing more is read (what follows could be
        SMTP commands a web page put in a form); one reply, as Postfix's, and close."""
        log.info("smtp client={client} disconnected: not an SMTP command: {line}",
                 client=self.peerHost, line=loggable(line, 100))
        self._buf = b""
        self._command = None
        self.sendCode(221, b"2.7.0 Error: not an SMTP command; closing the connection")
        self.closeConnection()

    def lookupMethod(self, command: bytes):
        """Only ASCII letters name a command: Twisted decodes the verb as ASCII and
        raised UnicodeDecodeError on 8-bit bytes, dropping the connection.  After a
        554 greeting every command but QUIT gets 503 (RFC 5321 §3.1)."""
        if not command.isalpha():
            return None
        if self._refused and command.upper() != b"QUIT":
            return self._refusedSession
        return super().lookupMethod(command)

    def _refusedSession(self, rest: bytes) -> None:
        self.sendCode(503, b"5.5.1 Bad sequence of commands: the session was refused; QUIT")

    def sendCode(self, code: int, message: bytes = b"") -> None:
        if not isinstance(message, bytes):
            message = str(message).encode("utf-8", "replace")
        if code >= 250 or code == 235 or code == 221:
            if self._command not in _NO_ENHANCED_FOR and not _HAS_ENHANCED.match(message):
                enhanced = _ENHANCED.get((code, self._command)) or _ENHANCED.get((code, None))
                if enhanced:
                    message = enhanced + b" " + message
        super().sendCode(code, message)
        self._waiting = False
        if code >= 400:
            self.factory.countRejection(code, message)
        if code >= 500:
            self._errors += 1
            if self._errors >= MAX_ERRORS and not self.transport.disconnecting:
                log.info("smtp client={client} disconnected after {n} errors",
                         client=self.peerHost, n=self._errors)
                super().sendCode(421, b"4.7.0 Too many errors, closing connection")
                self.closeConnection()
                return
        if not self._processing and self._buf:
            self._process()

    # -- TLS and authentication ---------------------------------------------------

    def _passwordsAllowed(self) -> bool:
        return self.factory.security.passwordsAllowed(
            self.peerHost, listenerHost(self.transport), self.secure)

    def ext_STARTTLS(self, rest: bytes) -> None:
        """RFC 3207.  Whatever the client pipelined after STARTTLS in plaintext is
        dropped, never read as commands over TLS (CVE-2011-0411), and the session
        starts over: no EHLO, no transaction, no authentication carried across."""
        if self.secure:
            self.sendCode(503, b"5.5.1 TLS already active")
        elif not self.canStartTLS:
            self.sendCode(454, b"4.7.0 TLS not available")
        elif rest.strip():
            self.sendCode(501, b"5.5.4 STARTTLS takes no arguments")
        else:
            self.sendCode(220, b"2.0.0 Ready to start TLS")
            self._buf = b""
            self._endChunking()
            self._helo = None
            self._from = None
            self._to = []
            self._session.startedTLS()
            self.client = Client(address=self.peerHost)
            self.authenticated = False
            self._flow.startTLS(self.ctx)
            self.startedTLS = self.secure = True

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.factory.offersAuth:
            self.sendCode(502, b"5.5.1 AUTH not offered here; use the submission port")
        elif not self._passwordsAllowed():
            self.sendCode(538, b"5.7.11 Encryption required: use STARTTLS first")  # RFC 4954 §6
        elif self._from is not None:
            self.sendCode(503, b"5.5.1 AUTH not allowed during a mail transaction")
        elif not rest.strip():
            # Twisted's ext_AUTH reads the first word unchecked (IndexError).
            self.sendCode(501, b"5.5.4 Syntax: AUTH mechanism [initial-response]")
        else:
            super().ext_AUTH(rest)

    def state_AUTH(self, response: bytes | None) -> None:
        """One step of the SASL exchange (RFC 4954 §4); the last one checks the password."""
        if response is None:
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
            return
        if response == b"*":
            self.mode = COMMAND
            self.sendCode(501, b"5.0.0 Authentication cancelled")
            return
        try:
            self.challenger.setResponse(base64.b64decode(b"" if response == b"=" else response,
                                                         validate=True))
        except (binascii.Error, ValueError):
            self.mode = COMMAND
            self.sendCode(501, b"5.5.2 Cannot decode the response")
            return
        if self.challenger.moreChallenges():
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
            return
        self.mode = COMMAND
        name = loggable(getattr(self.challenger, "username", b"") or b"")
        d = self.factory.portal.login(fromClient(self.challenger, self.peerHost, "smtp"), None,
                                      IMailAccount)

        def succeeded(result) -> None:
            _, account, logout = result
            logout()
            self.authenticated = True
            self.client = dataclasses.replace(self.client, authenticated=account.name)
            self._session.authenticated(account.name)
            log.info("smtp auth user={user} client={client} result=ok", user=account.name,
                     client=self.peerHost)
            self.sendCode(235, b"2.7.0 Authentication successful")

        def failed(failure) -> None:
            if failure.check(AccountsUnavailable):
                log.info("smtp auth user={user} client={client} result=tempfail: accounts "
                         "unavailable", user=name, client=self.peerHost)
                self.sendCode(454, b"4.7.0 Temporary authentication failure")
                return
            if not failure.check(credError.UnauthorizedLogin, credError.LoginDenied):
                log.failure("smtp auth failed unexpectedly", failure)
            log.info("smtp auth user={user} client={client} result=failed", user=name,
                     client=self.peerHost)
            self.sendCode(535, b"5.7.8 Authentication credentials invalid")

        d.addCallbacks(succeeded, failed)

    # -- commands --------------------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        self._declaredSize = None
        if self._heloRefused:
            self.sendCode(503, b"5.5.1 Send an accepted HELO/EHLO first")
            return
        if self._bdat is not None:
            self.sendCode(503, b"5.5.1 BDAT transaction in progress; finish it or RSET")
            return
        m = self.mail_re.match(rest)
        utf8 = bool(m and m.group("opts")
                    and any(p.upper() == b"SMTPUTF8" for p in m.group("opts").split()))
        problem = m and not self._from and _pathProblem(m.group("path"), utf8)
        if problem:
            self.sendCode(553, problem if problem == _NO_UTF8
                          else b"5.1.7 Bad sender address syntax: " + problem)
            return
        request, body = dsn.Request(), "7BIT"
        self._askedTLS = False
        if m and m.group("opts") and not self._from:
            for param in m.group("opts").split():
                key, _, value = param.partition(b"=")
                key = key.upper()
                if key == b"SIZE":
                    if not value.isdigit():
                        self.sendCode(501, b"5.5.4 SIZE needs a number")
                        return
                    self._declaredSize = int(value)  # RCPT's quota check (RFC 1870)
                    if int(value) > self.factory.config["max_message_size"]:
                        self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
                        return
                elif key == b"BODY" and value.upper() in (b"7BIT", b"8BITMIME", b"BINARYMIME"):
                    body = value.upper().decode()  # RFC 6152, RFC 3030 §3
                elif key == b"REQUIRETLS" and not value:
                    if not self.secure:  # RFC 8689 §2 item 7: the session itself uses TLS
                        self.sendCode(530, b"5.7.10 REQUIRETLS needs TLS: STARTTLS first")
                        return
                    if self._askedTLS:
                        self.sendCode(501, b"5.5.4 REQUIRETLS given twice")
                        return
                    self._askedTLS = True
                elif key == b"SMTPUTF8":
                    if value or param.endswith(b"="):
                        self.sendCode(501, b"5.5.4 SMTPUTF8 takes no value (RFC 6531 section 3.4)")
                        return
                    if not self._usedEhlo:  # RFC 6531 §3.4: only where EHLO offered it
                        self.sendCode(555, b"5.5.4 SMTPUTF8 needs EHLO, not HELO")
                        return
                else:
                    try:
                        known = dsn.parseMailParam(request, key, value)
                    except dsn.DSNError as e:
                        self.sendCode(501, b"5.5.4 " + str(e).encode())
                        return
                    if not known:
                        self.sendCode(555, b"5.5.4 Unsupported MAIL parameter " + key[:64])
                        return
        self._mailParams = (request, body, utf8)
        if not m or self._from or not _UNPRINTABLE.search(m.group("path")):
            super().do_MAIL(rest)
            return
        # Twisted's do_MAIL, with a UTF-8 path (checked above).
        self._to = []
        path = decodePath(m.group("path")).encode("utf-8")
        d = defer.maybeDeferred(self.validateFrom, self._helo, _UTF8Address(path, self.host))
        d.addCallbacks(self._cbFromValidate, self._ebFromValidate)

    def _cbFromValidate(self, fromEmail, code=250, msg=b"Sender address accepted"):
        self._dsn, self._body, self._smtputf8 = self._mailParams or (dsn.Request(), "7BIT", False)
        self._requireTLS = self._askedTLS
        super()._cbFromValidate(fromEmail, code, msg)

    def do_RCPT(self, rest: bytes) -> None:
        m = self.rcpt_re.match(rest)
        problem = self._from and m and _pathProblem(m.group("path"), self._smtputf8)
        if problem:
            self.sendCode(553, problem if problem == _NO_UTF8
                          else b"5.1.3 Bad recipient address syntax: " + problem)
            return
        self._rcptParams = (None, None)
        if self._from and m and m.group("opts"):
            params = [p.partition(b"=")[::2] for p in m.group("opts").split()]
            try:
                self._rcptParams = dsn.parseRcptParams([(k.upper(), v) for k, v in params])
            except dsn.DSNError as e:
                self.sendCode(501, b"5.5.4 " + str(e).encode())
                return
        if not self._from or not m or not _UNPRINTABLE.search(m.group("path")):
            super().do_RCPT(rest)
            return
        # Twisted's do_RCPT, with a UTF-8 path (checked above).
        dest = _UTF8Address(decodePath(m.group("path")).encode("utf-8"), self.host)
        user = smtp.User(dest, self._helo, self, self._from)
        user.dest = dest  # User copies it into an ASCII-only Address
        d = defer.maybeDeferred(self.validateTo, user)
        d.addCallbacks(self._cbToValidate, self._ebToValidate, callbackArgs=(user,))

    def _cbToValidate(self, to, user=None, code=250, msg=b"Recipient address accepted"):
        """An accepted recipient: its NOTIFY and ORCPT are kept under the address the
        queue will know it by (the relay address as given; a local one as given)."""
        notify, orcpt = self._rcptParams
        address = getattr(to, "address", None) or str(user.dest if user is not None else to)
        if notify is not None:
            self._dsn.notify[address] = notify
        if orcpt is not None:
            self._dsn.orcpt[address] = orcpt
        super()._cbToValidate(to, user, code, msg)

    def validateFrom(self, helo, origin):
        """The transaction decides (sender ownership on submission, rate limits, filters)."""
        return self._session.mailFrom(str(origin), self.client).addCallback(lambda _: origin)

    def validateTo(self, user):
        """A L{LocalRoute} or L{RelayRoute}, or L{Refused}: the transaction decides."""
        if len(self._to) >= self.factory.config["max_recipients"]:
            raise smtp.SMTPServerError(452, "4.5.3 Too many recipients")
        return self._session.rcptTo(str(user.dest), self.client, self._declaredSize)

    def do_EHLO(self, rest: bytes) -> None:
        self._greeted(rest, True)

    def do_HELO(self, rest: bytes) -> None:
        self._greeted(rest, False)

    def _greeted(self, rest: bytes, esmtp: bool) -> None:
        """HELO/EHLO resets the transaction (Twisted's do_EHLO and do_HELO do too) and
        asks the filters; a refusal is the reply, and the session is not greeted."""
        self._endChunking()
        self._from, self._to = None, []

        def answer(verdict: Verdict) -> None:
            self._heloRefused = verdict.action not in (ACCEPT, QUARANTINE, DISCARD)
            if self._heloRefused:
                self.sendCode(verdict.code, verdict.text.encode("utf-8", "replace"))
                return
            self._usedEhlo = esmtp
            (super(SMTPServer, self).do_EHLO if esmtp else super(SMTPServer, self).do_HELO)(rest)

        self._session.helo(rest.decode("ascii", "replace")).addCallback(answer)

    def do_RSET(self, rest: bytes) -> None:
        self._endChunking()
        self._from = None
        self._to = []
        self._session.reset()
        self.sendCode(250, b"2.0.0 Ok")

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 Ok")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"2.0.0 Bye")
        self.closeConnection()

    def do_VRFY(self, rest: bytes) -> None:
        # RFC 5321 §3.5.3: 252 neither confirms nor denies (no address harvesting).
        self.sendCode(252, b"2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def do_DATA(self, rest: bytes) -> None:
        if self._bdat is not None:
            self.sendCode(503, b"5.5.1 DATA in a BDAT transaction (RFC 3030 section 2)")
            return
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 Need MAIL and a valid RCPT before DATA")
            return
        if self._body == "BINARYMIME":
            self.sendCode(503, b"5.5.1 BODY=BINARYMIME needs BDAT, not DATA (RFC 3030 section 3)")
            return
        if rest.strip():
            self.sendCode(501, b"5.5.4 DATA takes no arguments")
            return
        self._source = self._startMessage()
        self._dataError = None
        self._midLine = False
        self.mode = DATA
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _startMessage(self) -> MessageSource:
        """The transaction's envelope and spool, at DATA or the first BDAT."""
        envelope, received = self._session.data(self._usedEhlo, self._smtputf8)
        self._envelope = dataclasses.replace(envelope, dsn=self._dsn, body=self._body,
                                             smtputf8=self._smtputf8, requireTLS=self._requireTLS)
        self._from = None
        self._to = []
        return MessageSource(prefix=received, spoolDir=self.factory.spoolDir)

    # -- BDAT (RFC 3030) ---------------------------------------------------------

    def do_BDAT(self, rest: bytes) -> None:
        """RFC 3030 §2: every octet of a chunk is read, even of a refused one, so the
        next command is found; a refusal is answered before the chunk is read."""
        try:
            size, last = parseArguments(rest)
        except ValueError:
            self.sendCode(501, b"5.5.4 Syntax: BDAT chunk-size [LAST]")
            return
        if self._bdat is None:
            if self._from is None or not self._to:
                self._skipChunk(size, 503, b"5.5.1 Need MAIL and a valid RCPT before BDAT")
                return
            self._bdat = self._startMessage()
        if self._bdat.size + size > self.factory.config["max_message_size"]:  # as DATA
            self._session.dataFailed(self._envelope, b"552 5.3.4 message too big (BDAT)",
                                     self._bdat.size + size)
            self._endChunking()
            self._skipChunk(size, 552, b"5.3.4 Message size exceeds fixed maximum message size")
            return
        self._chunk = ChunkReader(size, last, self._bdat.write)
        self._waiting = False  # answered once the chunk is read (_chunkRead)
        if not size:
            self._chunkRead()

    def _skipChunk(self, size: int, code: int, message: bytes) -> None:
        """Refuse now; the chunk's octets are dropped as they come."""
        self._chunk = ChunkReader(size, False, None) if size else None
        self.sendCode(code, message)

    def _chunkRead(self) -> None:
        chunk, self._chunk = self._chunk, None
        if chunk.sink is None:
            return  # refused when announced
        if not chunk.last:
            self._command = "BDAT"
            self._waiting = True
            self.sendCode(250, b"2.0.0 %d octets received" % self._bdat.bodySize)
            return
        self._source, self._bdat = self._bdat, None
        self._dataError = None
        self._endData()  # the end of DATA: the same filters, hop count and durability

    def _endChunking(self) -> None:
        """The BDAT transaction ends without a message (refused, RSET, HELO, STARTTLS)."""
        if self._bdat is not None:
            self._bdat.discard()
            self._bdat = None

    # -- DATA ------------------------------------------------------------------

    def _consumeData(self) -> bool:
        """Move complete lines from the buffer into the spool; True when DATA ended.

        Invariant: unless C{_midLine}, the buffer starts at the beginning of a line,
        so the terminator is ``.<CRLF>`` at offset 0 or ``<CRLF>.<CRLF>`` inside.
        """
        buf = self._buf
        if self._midLine:  # discarding the rest of an over-long line
            end = buf.find(b"\r\n")
            if end < 0:
                self._buf = buf[-1:]
                return False
            buf = buf[end + 2:]
            self._midLine = False
        if buf.startswith(b".\r\n"):
            self._buf = buf[3:]
            self._endData()
            return True
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            self._spool(buf[:end + 2])
            self._buf = buf[end + 5:]
            self._endData()
            return True
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            self._spool(buf[:cut + 2])
            buf = buf[cut + 2:]
        if len(buf) > self.factory.config["max_data_line_length"]:
            self._fail(552, b"5.3.4 Line too long in message data")
            self._midLine = True
            buf = buf[-1:]
        self._buf = buf
        return False

    def _spool(self, chunk: bytes) -> None:
        if self._dataError is not None:
            return
        # RFC 5321 §4.5.2: remove the first dot of every line that starts with one.
        if chunk[:1] == b".":
            chunk = chunk[1:]
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        if self._source.size + len(chunk) > self.factory.config["max_message_size"]:
            self._fail(552, b"5.3.4 Message size exceeds fixed maximum message size")
            return
        self._source.write(chunk)

    def _fail(self, code: int, message: bytes) -> None:
        if self._dataError is None:
            self._dataError = (code, message)
            self._source.discard()

    def _endData(self) -> None:
        self.mode = COMMAND
        self._command = "."
        self._waiting = True
        source, envelope = self._source, self._envelope
        self._source = None
        if self._dataError is not None:
            code, message = self._dataError
            self._session.dataFailed(envelope, message, source.size)
            self.sendCode(code, message)
            return

        def answer(reply: tuple[int, bytes]) -> None:
            code, message = reply
            if code == 250:
                self.factory.accepted.inc()
            self.sendCode(code, message)

        d = self._session.endOfData(envelope, source)
        d.addCallback(answer)
        d.addBoth(lambda ignored: source.discard())


def _notSMTP(line: bytes) -> bool:
    """An HTTP method or a header-shaped first word (see L{_FORBIDDEN_VERBS})."""
    verb = (line.split(None, 1) or [b""])[0].upper()
    return verb in _FORBIDDEN_VERBS or bool(_HEADER_SHAPED.match(line))


class SMTPFactory(smtp.SMTPFactory):
    """Holds what every SMTP connection shares: limits, routing, delivery."""

    protocol = SMTPServer
    noisy = False
    def __init__(self, config, hostname: str, router: Router, delivery, spoolDir: str,
                 limiter: ConnectionLimiter | None = None, security: Security | None = None,
                 portal=None, submission: bool = False, checkSender: bool = True,
                 sendLimits: SendLimits | None = None, metrics: Metrics | None = None,
                 filters: tuple[ConfiguredFilter, ...] = (), clock=None,
                 runInThread=None, showClient: bool = True, quota=None) -> None:
        """@param delivery: has C{deliver(envelope, source) -> Deferred}, durable when it fires
            (L{twistmail.delivery.pipeline.DeliveryPipeline}).
        @param submission: the RFC 6409 role: AUTH required before MAIL, the sender
            must be the user's own (C{checkSender}), Message-ID and Date added.
            Otherwise the MX role, which offers AUTH only if C{config["auth"]}.
        @param sendLimits: the hourly limits of authenticated senders (shared by every
            listener); None = unlimited.
        @param metrics: counts accepted messages and 4xx/5xx replies.
        @param filters: the configured filters of this listener's role, in order
            (L{twistmail.filters.load}); the built-in rules always run first.
        @param clock: times the filters (the reactor by default).
        @param runInThread: C{f(*args) -> Deferred}, for reading a spool on disk.
        @param showClient: see L{SMTPPolicy}.
        @param quota: a L{twistmail.delivery.quota.QuotaTracker}: RCPT refuses a full
            mailbox (452 4.2.2); None = no quotas."""
        super().__init__(portal)
        self.submission = submission
        self.security = security or Security()
        self.offersAuth = portal is not None and (submission or config["auth"])
        self.config = config
        self.hostname = hostname.encode("idna") if isinstance(hostname, str) else hostname
        self.router = router
        self.accounts = router.accounts
        self.delivery = delivery
        self.spoolDir = spoolDir
        self.limiter = limiter
        self.service = "submission" if submission else "smtp"
        self.policy = SMTPPolicy("submission" if submission else "inbound", self.hostname,
                                 router, delivery, filters, checkSender, sendLimits, clock,
                                 runInThread, showClient, quota)
        self.metrics = metrics or Metrics()
        self.accepted = self.metrics.smtpAccepted.labels(self.service)

    def countRejection(self, code: int, message: bytes) -> None:
        """A 4xx or 5xx reply, under its enhanced status code (RFC 3463), which the server
        chose: a client's text never becomes a label."""
        status = _STATUS_LABEL.match(message)
        status = status.group(1).decode() if status else "other"
        self.metrics.smtpRejected.labels(self.service, str(code), status).inc()

    def buildProtocol(self, addr):
        return admit(self.limiter, addr, b"421 4.7.0 ", self._build)

    def _build(self):
        p = self.protocol()
        p.factory = self
        return p
