# -*- test-case-name: tests.test_imap_server -*-
"""IMAP4rev1 (RFC 3501) on Twisted's IMAP4Server, over the storage interface.

What this subclass keeps from ``twisted.mail.imap4.IMAP4Server``: the
connection, the timeouts (TimeoutMixin), the response helpers and the
greeting.  What it replaces, and why:

* **Framing and parsing.**  Twisted splits arguments on spaces and quotes, so
  escaped quotes, nested lists, literals anywhere but at the end of a line
  and LITERAL+ do not work; L{wire} and L{parser} implement RFC 3501 §9.
  Sizes are checked before anything is buffered.
* **One command at a time**, in order, each answered before the next is
  read: pipelined commands get their replies in order, and a slow storage
  call never interleaves with the next command.
* **Flow control** (L{flow.Flow}): no command is started while the client
  leaves our answers unread (a FETCH waits mid-answer), and reading stops when
  more than L{flow.MAX_BACKLOG} octets wait unread by the command reader;
  literals are consumed as they come, so an APPEND streams.  Closing aborts
  a client that does not read.
* **Every command** is implemented against L{twistmail.interfaces}, with the
  response codes clients act on (RFC 5530 NONEXISTENT, TRYCREATE,
  ALREADYEXISTS, AUTHENTICATIONFAILED; RFC 4315 APPENDUID and COPYUID).
* **Extensions**: IDLE with push, UIDPLUS, MOVE, SPECIAL-USE, ENABLE,
  LITERAL+, SASL-IR, ID, UNSELECT, CHILDREN, NAMESPACE, APPENDLIMIT,
  CONDSTORE and QRESYNC (L{condstore}), UTF8=ACCEPT (RFC 6855: UTF-8 mailbox
  names and headers once enabled, RFC 6857 downgrading before: L{downgrade}).

Untagged updates (EXISTS, EXPUNGE, FLAGS) come from L{view.SelectedFolder}
at the end of each command, and at once while the client is in IDLE.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import collections
import time
import zlib
from collections.abc import Callable

from twisted.cred import credentials
from twisted.cred import error as credError
from twisted.internet import defer, protocol, task, threads
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

from twistmail import __version__
from twistmail._logtext import loggable
from twistmail.auth.checkers import fromClient
from twistmail.delivery.quota import OverQuota, Quota, QuotaTracker
from twistmail.errors import (
    AccountsUnavailable,
    FolderExists,
    InvalidFolderName,
    NoSuchFolder,
    NoSuchMessage,
    StorageError,
    TooManyKeywords,
)
from twistmail.interfaces import IMailAccount
from twistmail.model import StoredMessage
from twistmail.protocols.flow import MAX_BACKLOG, Flow
from twistmail.protocols.imap import (
    compress,
    condstore,
    esearch,
    fetch,
    listing,
    multiappend,
    names,
    quotaroot,
    response,
    search,
    sort,
    thread,
)
from twistmail.protocols.imap.parser import Arguments, ParseError
from twistmail.protocols.imap.view import SYSTEM_FLAGS, SelectedFolder
from twistmail.protocols.imap.wire import Command, CommandReader, Continue, Refused
from twistmail.protocols.limits import ConnectionLimiter, admit
from twistmail.protocols.security import Security, isSecure, listenerHost
from twistmail.protocols.tcp import sendAtOnce

log = Logger()

#: Read this many bytes of messages per worker-thread trip when FETCH or SEARCH needs them.
READ_BATCH = 1024 * 1024
#: Messages whose index-only SEARCH keys are evaluated before other connections get a turn.
SEARCH_SLICE = 5000
#: FETCH items answered from the folder snapshot's columns (L{IMAPServer._respondFlagColumns}),
#: and the FETCH lines written at a time by it.
_COLUMN_ITEMS = {b"UID", b"FLAGS"}
_COLUMN_CHUNK = 5000
_RECENT = frozenset({"\\Recent"})
#: Folders whose \Recent claims are remembered (least recently used forgotten first).
MAX_RECENT_FOLDERS = 10000
#: Failed logins a connection may make before it is closed.
MAX_LOGIN_FAILURES = 3
#: Commands that may be prefixed with UID, and commands during which EXPUNGE must wait.
_UID_COMMANDS = {b"COPY", b"FETCH", b"SEARCH", b"STORE", b"EXPUNGE", b"MOVE", b"SORT", b"THREAD"}
#: RFC 3501 §7.4.1, and RFC 5256 §3/§4 for SORT and THREAD: numbers would shift under the client.
_NO_EXPUNGE_DURING = {b"FETCH", b"STORE", b"SEARCH", b"SORT", b"THREAD"}


class _No(Exception):
    """Answer the command with C{NO <text>}."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


class _Bad(Exception):
    """Answer the command with C{BAD <text>}."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


def _storageNo(failure_or_error) -> bytes:
    """The NO response for a storage error, with the RFC 5530 code clients act on."""
    error = getattr(failure_or_error, "value", failure_or_error)
    if isinstance(error, NoSuchFolder):
        return b"[NONEXISTENT] Mailbox does not exist"
    if isinstance(error, FolderExists):
        return b"[ALREADYEXISTS] Mailbox already exists"
    if isinstance(error, InvalidFolderName):
        return b"[CANNOT] " + str(error).encode("utf-8", "replace")[:200]
    if isinstance(error, NoSuchMessage):
        return b"[EXPUNGEISSUED] Some of the messages no longer exist"
    if isinstance(error, TooManyKeywords):
        # Another session may have taken the last keyword since this command's check.
        return b"[LIMIT] " + str(error).encode("utf-8", "replace")[:200]
    return b"[SERVERBUG] " + str(error).encode("utf-8", "replace")[:200]


class IMAPServer(imap4.IMAP4Server):
    """One IMAP connection; configuration and shared state come from the factory."""

    IDENT = b"twistmail IMAP4rev1 ready"

    def __init__(self) -> None:
        super().__init__(chal={b"PLAIN": imap4.PLAINCredentials})
        self.account = None  # IMailAccount once logged in
        self.user = ""
        self.selected: SelectedFolder | None = None
        self.searchResult: list[tuple[int, int]] = []  # "$": UID ranges (RFC 5182)
        self._busy = False
        self._processing = False
        self._continuation: defer.Deferred | None = None
        self._loginFailures = 0
        self._flow: Flow | None = None
        self._inflater: compress.Inflater | None = None  # after COMPRESS DEFLATE
        self._inflateLater = None
        self.condstore = False  # RFC 7162 §3.1: enabled by the first command that uses it
        self.qresync = False  # RFC 7162 §3.2.3: ENABLE QRESYNC only
        self.utf8 = False  # RFC 6855 §3: ENABLE UTF8=ACCEPT only

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)
        config = self.factory.config
        self.timeOut = config["login_timeout"]
        self.POSTAUTH_TIMEOUT = config["timeout"]
        self.portal = self.factory.portal
        self.peerHost = getattr(self.transport.getPeer(), "host", "unknown")
        self.secure = isSecure(self.transport)
        self.reader = CommandReader(maxLine=config["max_line_length"],
                                    maxLiteral=config["max_literal_size"],
                                    maxMessage=config["max_message_size"],
                                    maxCommand=config["max_line_length"] + 4 * config["max_literal_size"],
                                    spoolDir=self.factory.spoolDir,
                                    maxMessages=multiappend.MAX_MESSAGES,
                                    maxAppend=multiappend.TOTAL_FACTOR * config["max_message_size"])
        self._flow = Flow(self.transport, lambda: self.timeOut or self.POSTAUTH_TIMEOUT,
                          drained=self._process, activity=self.resetTimeout, clock=self,
                          expired=self.timeoutConnection, name="imap")
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        if self._inflateLater is not None and self._inflateLater.active():
            self._inflateLater.cancel()
        if self._flow is not None:
            self._flow.lost()
        self.reader.discard()
        self._unselect()
        if self._continuation is not None:
            d, self._continuation = self._continuation, None
            d.errback(reason)
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        log.info("imap user={user} client={client} disconnected: idle too long",
                 user=self.user or "-", client=self.peerHost)
        self._send(b"* BYE Autologout; idle for too long")
        self.reader.dropBuffered()
        # A client that has not read our answers either is aborted.
        self._flow.close(self.timeOut or self.POSTAUTH_TIMEOUT, abort=self._flow.outputFull)
        self.setTimeout(None)  # when a line timed out (L{Flow.received}), not the idle timer

    def closeConnection(self) -> None:
        """Close once the client has read our answers, or abort if it has not within
        the idle timeout: C{loseConnection} alone would wait forever."""
        self._flow.close(self.timeOut or self.POSTAUTH_TIMEOUT)

    def capabilities(self) -> dict:
        caps: dict = {b"LITERAL+": None, b"SASL-IR": None, b"ID": None, b"ENABLE": None,
                      b"IDLE": None, b"NAMESPACE": None, b"UNSELECT": None, b"UIDPLUS": None,
                      b"MOVE": None, b"CHILDREN": None, b"SPECIAL-USE": None,
                      b"ESEARCH": None, b"SEARCHRES": None, b"SORT": None,
                      b"THREAD=ORDEREDSUBJECT": None, b"THREAD=REFERENCES": None,
                      b"LIST-EXTENDED": None, b"LIST-STATUS": None, b"STATUS=SIZE": None,
                      b"MULTIAPPEND": None, b"COMPRESS=DEFLATE": None,
                      **quotaroot.CAPABILITIES,
                      b"CONDSTORE": None, b"QRESYNC": None, b"UTF8=ACCEPT": None,
                      b"APPENDLIMIT=%d" % self.factory.config["max_message_size"]: None}
        if self.account is None:
            if not self.secure and self.factory.security.tls is not None:
                caps[b"STARTTLS"] = None
            if self._passwordsAllowed():
                caps[b"AUTH"] = [b"PLAIN"]
            else:
                caps[b"LOGINDISABLED"] = None  # RFC 3501 §6.2.3: STARTTLS first
        return caps

    def _passwordsAllowed(self) -> bool:
        return self.factory.security.passwordsAllowed(
            self.peerHost, listenerHost(self.transport), self.secure)

    # -- framing -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._inflater is not None:
            self._inflater.feed(data)  # inflated as the reader takes it: L{_inflate}
        else:
            self._flow.received(data)
            self.reader.feed(data)
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        inflated = 0
        try:
            while not self.transport.disconnecting and not self._flow.outputFull and (
                    not self._busy or self._continuation is not None):
                event = self.reader.next()
                if event is None:
                    if self._inflater is None or not self._inflater.pending:
                        return
                    if inflated >= compress.PER_TURN:
                        if self._inflateLater is None:
                            self._inflateLater = self.callLater(0, self._inflateNextTurn)
                        return
                    inflated += self._inflate()
                    continue
                if isinstance(event, Continue):
                    if self._continuation is None:
                        self.sendContinuationRequest(b"Ready for literal data")
                    continue
                if isinstance(event, Refused):
                    self._refused(event)
                    continue
                if self._continuation is not None:
                    d, self._continuation = self._continuation, None
                    d.callback(event)
                    continue
                self._busy = True
                self._run(event).addBoth(self._finished)
        finally:
            self._processing = False
            self._flow.backlog(self.reader.buffered + (
                self._inflater.pending if self._inflater is not None else 0) > MAX_BACKLOG)

    def _inflate(self) -> int:
        """RFC 4978: the next inflated piece of the client's input to the reader."""
        try:
            data = self._inflater.take()
        except zlib.error:
            log.info("imap user={user} client={client} disconnected: input is not deflate",
                     user=self.user or "-", client=self.peerHost)
            self._send(b"* BYE Input is not DEFLATE-compressed")
            self._inflater = compress.Inflater()  # nothing more is read
            self.closeConnection()
            return 0
        self._flow.received(data)
        self.reader.feed(data)
        return max(len(data), 1)

    def _inflateNextTurn(self) -> None:
        self._inflateLater = None
        self._process()

    def _refused(self, event: Refused) -> None:
        log.info("imap client={client} command refused: {why}", client=self.peerHost,
                 why=event.response.decode("ascii", "replace"))
        self._send(event.tag + b" " + event.response)
        if event.fatal:
            self._send(b"* BYE Cannot recover from that; closing the connection")
            self.closeConnection()

    def _finished(self, result) -> None:
        self._busy = False
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.failure("imap command failed", result)
        self._process()

    def _send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def _tagged(self, tag: bytes, status: bytes, text: bytes) -> None:
        self._send(tag + b" " + status + b" " + text)

    # -- dispatch ------------------------------------------------------------------

    def _run(self, command: Command) -> defer.Deferred:
        args = Arguments(command.parts)
        tag = b"*"
        try:
            tag = args.tag()
            if not args.accept(b" "):
                raise ParseError("missing command")
            name = args.atom().upper()
            uid = False
            if name == b"UID":
                args.sp()
                name = args.atom().upper()
                if name not in _UID_COMMANDS:
                    raise ParseError(f"UID {name[:20].decode('ascii', 'replace')} is not a command")
                uid = True
            entry = _COMMANDS.get(name)
            if entry is None:
                raise _Bad(b"Unknown command " + name[:32])
            handler, states = entry
            if self.state not in states:
                raise _Bad(self._wrongState(name))
            result = handler(self, tag, args, uid) if uid else handler(self, tag, args)
        except (ParseError, _Bad, _No, search.BadCharset) as e:
            command.discard()
            self._answerError(tag, e, expunge=True)
            return defer.succeed(None)
        d = defer.Deferred.fromCoroutine(result) if hasattr(result, "send") else \
            defer.succeed(result)
        expunge = not (name in _NO_EXPUNGE_DURING and not uid)

        def failed(failure):
            if failure.check(ParseError, _Bad, _No, search.BadCharset, StorageError):
                self._answerError(tag, failure.value, expunge)
                return None
            if failure.check(defer.CancelledError, ConnectionDone) or self.transport.disconnecting:
                return None
            log.failure("imap {command} failed for {user}", failure, command=name, user=self.user)
            self._tagged(tag, b"NO", b"[SERVERBUG] Internal error; try again later")
            return None

        return d.addErrback(failed).addBoth(lambda r: command.discard() or r)

    def _answerError(self, tag: bytes, error: Exception, expunge: bool) -> None:
        self._flushUpdates(expunge)
        if isinstance(error, ParseError):
            self._tagged(tag, b"BAD", b"Syntax error: " + str(error).encode("utf-8", "replace")[:200])
        elif isinstance(error, _Bad):
            self._tagged(tag, b"BAD", error.text)
        elif isinstance(error, search.BadCharset) and self.utf8:
            # RFC 6855 §3: after ENABLE UTF8=ACCEPT the strings are UTF-8, whatever CHARSET says.
            self._tagged(tag, b"BAD", b"CHARSET conflicts with UTF8=ACCEPT: strings are UTF-8")
        elif isinstance(error, search.BadCharset):
            self._tagged(tag, b"NO", b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        elif isinstance(error, _No):
            self._tagged(tag, b"NO", error.text)
        else:
            self._tagged(tag, b"NO", _storageNo(error))

    def _wrongState(self, name: bytes) -> bytes:
        if self.state == "unauth":
            return b"Log in first (" + name + b")"
        if name in (b"LOGIN", b"AUTHENTICATE"):
            return b"Already authenticated"
        return b"No mailbox selected (" + name + b")"

    def _ok(self, tag: bytes, text: bytes, expunge: bool = True) -> None:
        self._flushUpdates(expunge)
        self._tagged(tag, b"OK", text)

    def _flushUpdates(self, expunge: bool = True) -> None:
        view = self.selected
        if view is None:
            return
        if view.validityChanged:
            self._send(b"* BYE The mailbox's UIDVALIDITY changed; please reconnect")
            self.closeConnection()
            return
        for line in view.updates(expunge):
            self._send(line)

    # -- any state ------------------------------------------------------------------

    def cmd_CAPABILITY(self, tag, args):
        args.end()
        self._send(b"* CAPABILITY " + b" ".join(self.listCapabilities()))
        self._ok(tag, b"CAPABILITY completed")

    def cmd_NOOP(self, tag, args):
        args.end()
        return self._noop(tag, b"NOOP completed")

    async def _noop(self, tag: bytes, text: bytes) -> None:
        if self.selected is not None:
            try:
                await self.selected.mailbox.refresh()
            except NoSuchFolder:
                self._selectedGone()
                return
        self._ok(tag, text)

    def _selectedGone(self) -> None:
        """RFC 2180 §3, as Dovecot: another session deleted (or renamed) the selected
        folder; nothing this session could do in it means anything any more."""
        self._send(b"* BYE Selected mailbox was deleted, have to disconnect")
        self.closeConnection()

    def cmd_LOGOUT(self, tag, args):
        args.end()
        self._send(b"* BYE twistmail logging out")
        self._tagged(tag, b"OK", b"LOGOUT completed")
        self.state = "logout"
        self.closeConnection()

    def cmd_ID(self, tag, args):
        """RFC 2971: log what the client says it is, say what we are."""
        args.sp()
        if args.accept(b"NIL"):
            fields = []
        else:
            fields = args.parenthesized(args.nstring)
        args.end()
        if len(fields) % 2 or len(fields) > 60:
            raise _Bad(b"ID takes field-value pairs")
        client = {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
        if client:
            log.info("imap client={client} id={id}", client=self.peerHost,
                     id=" ".join(f"{loggable(k, 32)}={loggable(v or b'', 64)}"
                                 for k, v in list(client.items())[:10]))
        self._send(b'* ID ("name" "twistmail" "version" ' + response.string(__version__) + b")")
        self._ok(tag, b"ID completed")

    def cmd_ENABLE(self, tag, args):
        """RFC 5161: CONDSTORE and QRESYNC (RFC 7162 §3.2.3: QRESYNC implies CONDSTORE),
        UTF8=ACCEPT (RFC 6855 §3); others are ignored, as the RFC asks."""
        args.sp()
        wanted = []
        while True:
            wanted.append(args.atom().upper())
            if args.atEnd():
                break
            args.sp()
        if b"UTF8=ACCEPT" in wanted and self.selected is not None:
            # RFC 6855 §3: only in the authenticated state; the names and strings
            # of the selected folder's session were already sent the other way.
            raise _Bad(b"ENABLE UTF8=ACCEPT only before SELECT or EXAMINE (RFC 6855 section 3)")
        current = {b"CONDSTORE": self.condstore, b"QRESYNC": self.qresync, b"UTF8=ACCEPT": self.utf8}
        # RFC 5161 §3.2: ENABLED names what the client asked for and we enabled.
        enabled = [name for name, on in current.items() if name in wanted and not on]
        if b"UTF8=ACCEPT" in wanted:
            self.utf8 = True
        if b"QRESYNC" in wanted:
            self.qresync = True
            if self.selected is not None:
                self.selected.qresync = True
        if b"CONDSTORE" in wanted or b"QRESYNC" in wanted:
            self._enableCondstore(announce=True)
        self._send(b"* ENABLED" + b"".join(b" " + name for name in enabled))
        self._ok(tag, b"ENABLE completed")

    def cmd_COMPRESS(self, tag, args):
        """RFC 4978: raw deflate both ways from right after the tagged OK (§3)."""
        args.sp()
        mechanism = args.atom().upper()
        args.end()
        if mechanism != b"DEFLATE":
            raise _Bad(b"Unknown compression mechanism")
        if self._inflater is not None:
            raise _No(b"[COMPRESSIONACTIVE] DEFLATE is active already")
        self._ok(tag, b"DEFLATE active")
        self.transport = compress.DeflatingTransport(self.transport)
        self._inflater = compress.Inflater()
        # Whatever followed the command line is the client's compressed stream.
        self._inflater.feed(self.reader.takeBuffered())
    def _enableCondstore(self, announce: bool = False) -> None:
        """RFC 7162 §3.1: from now on this session's flag updates carry MODSEQ.

        @param announce: tell the selected folder's HIGHESTMODSEQ now (§3.1.2.1, as
            Dovecot does when ENABLE comes after SELECT)."""
        first = not self.condstore
        self.condstore = True
        view = self.selected
        if view is not None:
            view.condstore = True
            if first and announce and condstore.hasModSeqs(view.mailbox):
                self._send(b"* OK [HIGHESTMODSEQ %d] Highest" % view.mailbox.highestModSeq)

    def _modseqMailbox(self):
        """The selected folder, which must keep modseqs: RFC 7162 §3.1.2.2, BAD otherwise."""
        mailbox = self.selected.mailbox
        if not condstore.hasModSeqs(mailbox):
            raise _Bad(b"This mailbox has no mod-sequences (NOMODSEQ)")
        return mailbox

    # -- not authenticated -------------------------------------------------------------

    def cmd_STARTTLS(self, tag, args):
        """RFC 3501 §6.2.1.  Whatever the client sent after STARTTLS in plaintext is
        dropped, never read as commands over TLS (CVE-2011-0411)."""
        args.end()
        if self.secure:
            raise _Bad(b"TLS is already active")
        if self.factory.security.tls is None:
            raise _No(b"TLS is not available")
        self._tagged(tag, b"OK", b"Begin TLS negotiation now")
        self.reader.dropBuffered()
        self._flow.startTLS(self.factory.security.tls)
        self.secure = True

    def cmd_LOGIN(self, tag, args):
        args.sp()
        user = args.astring()
        args.sp()
        password = args.astring()
        args.end()
        return self._login(tag, user, password)

    async def cmd_AUTHENTICATE(self, tag, args):
        """AUTHENTICATE PLAIN, with the response inline (RFC 4959 SASL-IR) or after ``+``."""
        args.sp()
        mechanism = args.atom().upper()
        initial = None
        if args.accept(b" "):
            initial = args.atom()
        args.end()
        if mechanism != b"PLAIN":
            raise _No(b"Unsupported authentication mechanism")
        if initial is None:
            self._send(b"+ ")
            reply = await self._nextLine()
            initial = b"".join(p for p in reply.parts if isinstance(p, bytes)).strip()
        if initial == b"*":
            raise _Bad(b"Authentication cancelled")
        if initial == b"=":
            initial = b""  # RFC 4959: an empty initial response
        try:
            decoded = base64.b64decode(initial, validate=True)
            authz, user, password = decoded.split(b"\0")
        except (binascii.Error, ValueError):
            raise _Bad(b"Malformed PLAIN response") from None
        if authz and authz != user:
            raise _No(b"[AUTHORIZATIONFAILED] Cannot act as another user")
        await self._login(tag, user, password)

    def _nextLine(self) -> defer.Deferred:
        self._continuation = defer.Deferred()
        return self._continuation

    async def _login(self, tag: bytes, user: bytes, password: bytes) -> None:
        name = loggable(user)
        if not self._passwordsAllowed():
            log.info("imap login user={user} client={client} result=refused: no TLS",
                     user=name, client=self.peerHost)
            raise _No(b"[PRIVACYREQUIRED] Passwords only over TLS: use STARTTLS first")
        try:
            _, account, logout = await self.portal.login(
                fromClient(credentials.UsernamePassword(user, password), self.peerHost, "imap"),
                None, IMailAccount)
        except AccountsUnavailable:
            log.info("imap login user={user} client={client} result=tempfail: accounts "
                     "unavailable", user=name, client=self.peerHost)
            self._tagged(tag, b"NO", b"[UNAVAILABLE] Temporary authentication failure, "
                         b"try again later")
            return
        except (credError.UnauthorizedLogin, credError.LoginDenied):
            self._loginFailures += 1
            log.info("imap login user={user} client={client} result=failed", user=name,
                     client=self.peerHost)
            self._tagged(tag, b"NO", b"[AUTHENTICATIONFAILED] Authentication failed")
            if self._loginFailures >= MAX_LOGIN_FAILURES:
                self._send(b"* BYE Too many failed logins")
                self.closeConnection()
            return
        self.account = account
        self._onLogout = logout
        self.user = account.name
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        log.info("imap login user={user} client={client} result=ok", user=self.user,
                 client=self.peerHost)
        try:
            await self.factory.ensureSpecialUse(account)
        except StorageError:
            log.failure("imap could not create the special-use folders of {user}", user=self.user)
        self._tagged(tag, b"OK", b"[CAPABILITY " + b" ".join(self.listCapabilities()) +
                     b"] Logged in")

    # -- authenticated: mailboxes ----------------------------------------------------------

    def _mailbox(self, args: Arguments) -> str:
        return self._mailboxName(args.astring())

    def _mailboxName(self, wire: bytes) -> str:
        try:
            return names.decode(wire, self.utf8)
        except names.BadName as e:
            raise _No(b"[CANNOT] " + str(e).encode()) from None

    async def cmd_SELECT(self, tag, args, readOnly: bool = False):
        args.sp()
        name = self._mailbox(args)
        params = condstore.parseSelectParams(args)
        args.end()
        if params.qresync is not None and not self.qresync:
            raise _Bad(b"QRESYNC must be enabled first (ENABLE QRESYNC)")  # RFC 7162 §3.2.5
        if self.selected is not None and self.qresync:
            self._send(b"* OK [CLOSED] Previous mailbox closed")  # RFC 7162 §3.2.11
        self._unselect()
        self.state = "auth"
        mailbox = await self.account.openFolder(name)
        # RFC 3501 §6.3.2: EXAMINE shows \Recent but does not take it (as Dovecot).
        view = SelectedFolder(mailbox, readOnly, self._peekRecent if readOnly else self._claimRecent)
        self.selected = view
        self.state = "select"
        view.qresync = self.qresync
        if params.condstore or params.qresync is not None:
            self.condstore = True
        view.condstore = self.condstore
        for line in view.flagsResponses():
            self._send(line)
        self._send(b"* %d EXISTS" % len(view))
        self._send(b"* %d RECENT" % len(view.recent))
        unseen = next((seq for seq, flags in enumerate(mailbox.flagColumn(), 1)
                       if "\\Seen" not in flags), None)
        if unseen:
            self._send(b"* OK [UNSEEN %d] First unseen" % unseen)
        self._send(b"* OK [UIDVALIDITY %d] UIDs valid" % mailbox.uidValidity)
        self._send(b"* OK [UIDNEXT %d] Predicted next UID" % mailbox.uidNext)
        if not condstore.hasModSeqs(mailbox):
            self._send(b"* OK [NOMODSEQ] No mod-sequences in this mailbox")  # RFC 7162 §3.1.2.2
        elif self.condstore:
            self._send(b"* OK [HIGHESTMODSEQ %d] Highest" % mailbox.highestModSeq)
            if params.qresync is not None:
                self._resync(view, params.qresync)
        verb = b"EXAMINE" if readOnly else b"SELECT"
        self._ok(tag, (b"[READ-ONLY] " if readOnly else b"[READ-WRITE] ") + verb + b" completed")

    def _resync(self, view: SelectedFolder, q: condstore.QResync) -> None:
        """RFC 7162 §3.2.5: what the client missed since its modseq, if its UIDVALIDITY holds."""
        mailbox = view.mailbox
        if q.uidValidity != mailbox.uidValidity:
            return  # the client must resync from scratch; it learns so from UIDVALIDITY
        known = q.knownUids if q.knownUids is not None else [(1, max(mailbox.uidNext - 1, 1))]
        for line in condstore.vanishedLines(condstore.vanished(mailbox, view.uids, q.modseq, known),
                                            earlier=True):
            self._send(line)
        for seq, uid in condstore.changed(mailbox, q.modseq, view):
            message = mailbox.message(uid)
            if message is not None:
                self._send(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))" % (
                    seq, uid, view.flagList(message), message.modseq))

    def cmd_EXAMINE(self, tag, args):
        return self.cmd_SELECT(tag, args, readOnly=True)

    def _claimRecent(self, mailbox, uids) -> set:
        return self.factory.claimRecent(self.user, mailbox, uids)

    def _peekRecent(self, mailbox, uids) -> set:
        return self.factory.claimRecent(self.user, mailbox, uids, take=False)

    def _unselect(self) -> None:
        self.searchResult = []  # RFC 5182 §2.1: "$" is empty in a newly selected folder
        if self.selected is not None:
            self.selected.close()
            self.selected = None
        if self.state == "select":
            self.state = "auth"

    async def cmd_CREATE(self, tag, args):
        args.sp()
        name = self._mailbox(args).rstrip(names.SEPARATOR)
        args.end()
        if name.upper() == "INBOX":
            raise _No(b"[ALREADYEXISTS] INBOX always exists")
        await self.account.createFolder(name)
        self._ok(tag, b"CREATE completed")

    async def cmd_DELETE(self, tag, args):
        args.sp()
        name = self._mailbox(args)
        args.end()
        if name == "INBOX":
            raise _No(b"[CANNOT] INBOX cannot be deleted")
        if self.selected is not None and self.selected.mailbox.name == name:
            self._unselect()
        await self.account.deleteFolder(name)
        self.factory.quota.forget(self.user)
        self._ok(tag, b"DELETE completed")

    async def cmd_RENAME(self, tag, args):
        args.sp()
        old = self._mailbox(args)
        args.sp()
        new = self._mailbox(args).rstrip(names.SEPARATOR)
        args.end()
        await self.account.renameFolder(old, new)
        self._ok(tag, b"RENAME completed")

    async def cmd_SUBSCRIBE(self, tag, args, subscribe: bool = True):
        args.sp()
        name = self._mailbox(args)
        args.end()
        # As Dovecot: a subscription needs the folder; removing one does not (the
        # folder may have been deleted since).
        if subscribe and name not in await self.account.listFolders():
            raise _No(b"[NONEXISTENT] Mailbox does not exist")
        await self.account.setSubscribed(name, subscribe)
        self._ok(tag, b"SUBSCRIBE completed" if subscribe else b"UNSUBSCRIBE completed")

    def cmd_UNSUBSCRIBE(self, tag, args):
        return self.cmd_SUBSCRIBE(tag, args, subscribe=False)

    def cmd_NAMESPACE(self, tag, args):
        args.end()
        self._send(b'* NAMESPACE (("" "/")) NIL NIL')
        self._ok(tag, b"NAMESPACE completed")

    async def cmd_LIST(self, tag, args, lsub: bool = False):
        """LIST and LSUB with RFC 5258 options and RFC 5819 STATUS: L{listing}."""
        request = listing.parse(args, lsub, self.utf8)
        if request.patternCount > listing.MAX_LIST_PATTERNS:
            raise _Bad(b"Too many LIST patterns: at most %d" % listing.MAX_LIST_PATTERNS)
        verb = request.verb
        if request.rootOnly:
            self._send(b"* " + verb + b' (\\Noselect) "/" ""')
            self._ok(tag, verb + b" completed")
            return
        if not request.matchers:
            self._ok(tag, verb + b" completed")
            return
        folderNames = await self.account.listFolders()
        subscribed = set(await self.account.subscriptions())
        for entry in listing.select(request, folderNames, subscribed, self.factory.specialUse):
            self._send(entry.line(verb, self.utf8))
            if request.status and entry.selectable:
                # RFC 5819 §2: a folder that cannot be opened now gets no STATUS line.
                try:
                    mailbox = await self.account.openFolder(entry.name)
                except StorageError:
                    continue
                self._send(self._statusLine(entry.name, mailbox, request.status))
        self._ok(tag, verb + b" completed")

    def cmd_LSUB(self, tag, args):
        return self.cmd_LIST(tag, args, lsub=True)

    async def cmd_STATUS(self, tag, args):
        args.sp()
        name = self._mailbox(args)
        args.sp()
        items = listing.statusItems(args)
        args.end()
        mailbox = await self.account.openFolder(name)
        if b"HIGHESTMODSEQ" in items:
            self._enableCondstore()  # RFC 7162 §3.1: a CONDSTORE enabling command
        self._send(self._statusLine(name, mailbox, items))
        self._ok(tag, b"STATUS completed")

    def _statusLine(self, name: str, mailbox, items: list[bytes]) -> bytes:
        values = {
            b"MESSAGES": lambda: len(mailbox.uids()),
            b"RECENT": lambda: self.factory.countRecent(self.user, mailbox),
            b"UIDNEXT": lambda: mailbox.uidNext,
            b"UIDVALIDITY": lambda: mailbox.uidValidity,
            b"UNSEEN": lambda: sum("\\Seen" not in m.flags for m in mailbox.messages()),
            # RFC 8438 §2: the octets of every message, as RFC822.SIZE counts them.
            b"SIZE": lambda: sum(m.size for m in mailbox.messages()),
            # RFC 7162 §3.1.2.3: 0 for a mailbox without mod-sequences.
            b"HIGHESTMODSEQ": lambda: mailbox.highestModSeq if condstore.hasModSeqs(mailbox) else 0,
        }
        body = b" ".join(b"%s %d" % (item, values[item]()) for item in items)
        return (b"* STATUS " + response.astring(names.encode(name, self.utf8), self.utf8) +
                b" (" + body + b")")

    async def cmd_APPEND(self, tag, args):
        """APPEND, with MULTIAPPEND (RFC 3502): L{multiappend}."""
        args.sp()
        name = self._mailbox(args)
        args.sp()
        messages = multiappend.parse(args, self.utf8)
        args.end()
        if len(messages) > multiappend.MAX_MESSAGES:
            raise _No(b"[LIMIT] At most %d messages in one APPEND" % multiappend.MAX_MESSAGES)
        batch = [(m.literal.source, self._storableFlags(m.flags), m.when) for m in messages]
        try:
            mailbox = await self.account.openFolder(name)
        except NoSuchFolder:
            raise _No(b"[TRYCREATE] No such mailbox") from None
        octets = sum(m.literal.size for m in messages)
        await self._reserveQuota(octets, len(messages))
        # What is already in the folder is settled first: the appended message is
        # \Recent whatever INTERNALDATE it was given.
        self.factory.settleRecent(self.user, mailbox)
        uids = await self._forgetQuotaOnFailure(multiappend.appendAll(mailbox, batch))
        log.info("imap append user={user} folder={folder} uids={uids} size={size}", user=self.user,
                 folder=loggable(name), uids=response.sequenceSet(uids).decode(),
                 size=octets)
        # RFC 4315 §3: APPENDUID's uid-set covers every message of a MULTIAPPEND.
        self._ok(tag, b"[APPENDUID %d %s] APPEND completed" % (mailbox.uidValidity, response.sequenceSet(uids)))

    async def _reserveQuota(self, octets: int, messages: int) -> None:
        """RFC 9208 §7.1: NO [OVERQUOTA] unless the messages fit; counted at once if they do."""
        try:
            await self.factory.quota.reserve(self.user, octets, messages)
        except OverQuota:
            log.info("imap user={user} client={client} result=over quota", user=self.user,
                     client=self.peerHost)
            raise _No(b"[OVERQUOTA] Quota exceeded: delete some mail first") from None

    async def _forgetQuotaOnFailure(self, stored):
        """Await C{stored}; if it fails, what L{_reserveQuota} counted is not stored."""
        try:
            return await stored
        except BaseException:
            self.factory.quota.forget(self.user)
            raise

    async def cmd_GETQUOTAROOT(self, tag, args):
        """RFC 9208 §4.1.2: one quota root, "", for all of a user's folders (as Dovecot)."""
        args.sp()
        wire = args.astring()
        args.end()
        name = self._mailboxName(wire)
        await self.account.openFolder(name)  # NO [NONEXISTENT] for a folder that is not there
        quota = self.factory.quota
        limits = quota.limits(self.user)
        usage = None if limits.unlimited else await quota.usage(self.user)
        for line in quotaroot.rootResponses(response.astring(wire, self.utf8), limits, usage):
            self._send(line)
        self._ok(tag, b"GETQUOTAROOT completed")

    async def cmd_GETQUOTA(self, tag, args):
        """RFC 9208 §4.1.1."""
        args.sp()
        root = args.astring()
        args.end()
        quota = self.factory.quota
        limits = quota.limits(self.user)
        if root != quotaroot.ROOT or limits.unlimited:
            raise _No(b"[NONEXISTENT] No such quota root")
        self._send(quotaroot.quotaResponse(limits, await quota.usage(self.user)))
        self._ok(tag, b"GETQUOTA completed")

    def cmd_SETQUOTA(self, tag, args):
        """RFC 9208 §4.1.3: only with QUOTASET, which is not offered: the admin sets quotas."""
        raise _No(b"[NOPERM] Quotas are set by the administrator (twistmail user quota)")

    def _storableFlags(self, flags: list[bytes]) -> set[str]:
        out = set()
        for flag in flags:
            text = flag.decode("utf-8", "replace")
            if text.startswith("\\"):
                if text == "\\Recent":
                    continue  # RFC 3501 §2.3.2: not settable
                match = [f for f in SYSTEM_FLAGS if f.lower() == text.lower()]
                if not match:
                    raise _Bad(b"Unknown system flag " + flag[:32])
                text = match[0]
            out.add(text)
        return out

    # -- selected ----------------------------------------------------------------------

    def cmd_CHECK(self, tag, args):
        args.end()
        return self._noop(tag, b"CHECK completed")

    async def cmd_CLOSE(self, tag, args):
        args.end()
        view = self.selected
        if not view.readOnly:
            deleted = [m.uid for m in view.mailbox.messages() if "\\Deleted" in m.flags]
            if deleted:
                await view.mailbox.remove(deleted)
                self.factory.quota.forget(self.user)
        self._unselect()
        self._tagged(tag, b"OK", b"CLOSE completed")

    def cmd_UNSELECT(self, tag, args):
        args.end()
        self._unselect()
        self._tagged(tag, b"OK", b"UNSELECT completed")

    async def cmd_EXPUNGE(self, tag, args, uid: bool = False):
        view = self.selected
        allowed = None
        if uid:
            args.sp()
            allowed = {u for _, u in view.byUid(self._uidRanges(args.sequenceSet()))}
        args.end()
        if view.readOnly:
            raise _No(b"[READ-ONLY] Mailbox is read-only")
        deleted = [m.uid for m in view.mailbox.messages() if "\\Deleted" in m.flags
                   and (allowed is None or m.uid in allowed)]
        if deleted:
            await view.mailbox.remove(deleted)
            self.factory.quota.forget(self.user)
        self._ok(tag, b"EXPUNGE completed")

    def _targets(self, args: Arguments, uid: bool) -> list[tuple[int, int]]:
        return self._targetsOf(args.sequenceSet(), uid)

    def _targetsOf(self, seqset, uid: bool) -> list[tuple[int, int]]:
        return self.selected.pairs(self._spansOf(seqset, uid))

    def _spansOf(self, seqset, uid: bool) -> list[tuple[int, int]]:
        """The messages of a sequence set as L{SelectedFolder.seqSpans}."""
        view = self.selected
        if uid or seqset.saved:
            return view.uidSpans(self._uidRanges(seqset))
        if not len(view):
            if seqset.usesStar():
                raise _Bad(b"No messages: * has no meaning")
            raise _Bad(b"No such message")
        resolved = seqset.resolve(len(view))
        if resolved[-1][1] > len(view):
            raise _Bad(b"No such message: the mailbox has %d" % len(view))
        return view.seqSpans(resolved)

    def _uidRanges(self, seqset) -> list[tuple[int, int]]:
        """UID ranges of a UID command's set, or of ``$`` in any command (RFC 5182 §2.1)."""
        return self.searchResult if seqset.saved else seqset.resolve(self.selected.largestUid())

    async def cmd_FETCH(self, tag, args, uid: bool = False):
        args.sp()
        seqset = args.sequenceSet()
        args.sp()
        items = fetch.parseItems(args)
        changedSince, vanished = condstore.parseFetchModifiers(args)
        args.end()
        view = self.selected
        mailbox = view.mailbox
        # UID FETCH 1:* (FLAGS) (CHANGEDSINCE n) lists the changes, not the folder.
        spans = None if changedSince is not None and uid else self._spansOf(seqset, uid)
        if vanished and not (uid and self.qresync):
            raise _Bad(b"VANISHED needs UID FETCH and QRESYNC enabled")  # RFC 7162 §3.2.6
        if uid and not any(i.name == b"UID" for i in items):
            items.insert(0, fetch.Item(b"UID"))
        if changedSince is not None or any(i.name == b"MODSEQ" for i in items):
            self._modseqMailbox()
            self._enableCondstore()  # RFC 7162 §3.1: a CONDSTORE enabling command
            if not any(i.name == b"MODSEQ" for i in items):
                items.append(fetch.Item(b"MODSEQ"))  # RFC 7162 §3.1.4.1: CHANGEDSINCE implies it
        if (changedSince is None and view.uids is mailbox.uids()
                and all(i.name in _COLUMN_ITEMS for i in items)):
            # UID FETCH 1:* (FLAGS), the view in step with the folder: from its flag
            # column (these items never set \Seen, and no message has gone).
            for line in view.newKeywords():
                self._send(line)
            await self._respondFlagColumns(view, spans, items, mailbox.flagColumn())
            self._ok(tag, b"FETCH completed", expunge=uid)
            return
        targets = None if spans is None else view.pairs(spans)
        if changedSince is not None:
            if vanished:
                largest = max(view.largestUid(), mailbox.uidNext - 1)
                for line in condstore.vanishedLines(condstore.vanished(
                        mailbox, view.uids, changedSince, seqset.resolve(largest)), earlier=True):
                    self._send(line)
            targets = condstore.changed(mailbox, changedSince, view, targets,
                                        None if targets is not None else seqset.resolve(view.largestUid()))
        if not view.readOnly and any(i.setsSeen for i in items):
            unseen = [u for _, u in targets
                      if (m := mailbox.message(u)) is not None and "\\Seen" not in m.flags]
            if unseen:
                await mailbox.setFlags(unseen, {"\\Seen"}, "add")
                if not any(i.name == b"FLAGS" for i in items):
                    items.append(fetch.Item(b"FLAGS"))
                if self.condstore and not any(i.name == b"MODSEQ" for i in items):
                    items.append(fetch.Item(b"MODSEQ"))  # the flag change's new modseq
        for line in view.newKeywords():
            self._send(line)
        if await self._respondFetch(view, targets, items):
            # RFC 2180 §4.1.2, as Dovecot's cmd-fetch.c: not a failure, the client can do
            # nothing about it; the untagged EXPUNGE follows at the next allowed point.
            self._ok(tag, b"[EXPUNGEISSUED] Some messages were already expunged", expunge=uid)
        else:
            self._ok(tag, b"FETCH completed", expunge=uid)

    async def _respondFetch(self, view: SelectedFolder, targets: list, items: list) -> bool:
        """Write the FETCH responses; True if some message's text had gone (expunged by
        another session: answered from this session's view, NIL for its text)."""
        mailbox = view.mailbox
        needsMessage = any(i.needsMessage for i in items)
        missing = False
        batch: list[tuple[int, int, object]] = []
        batchBytes = 0
        lines: list[bytes] = []
        # What every message's answer repeats (a section's field list can be 64 KiB):
        # counted with the message sizes, so a batch's answers stay near READ_BATCH.
        overhead = 64 + sum(len(i.sectionLabel()) for i in items if i.isSection)
        # When the view has no pending changes, sequence number n is the folder
        # snapshot's n-th message: no lookup by uid (this is UID FETCH 1:* FLAGS).
        snapshot = mailbox.messages() if view.uids is mailbox.uids() else None
        for seq, u in targets:
            message = snapshot[seq - 1] if snapshot is not None else view.message(u)
            if message is None:
                # Expunged by another session, and the backend kept nothing of it.
                message = StoredMessage(u, "", frozenset(), 0, 0)
                missing = True
            view.told(u, message.flags)
            if not needsMessage:
                # Index-only items: no disk access; written a few hundred lines at a time.
                lines.append(b"* %d FETCH (" % seq + b" ".join(
                    fetch.render(i, message, None, self._flags(view, message)) for i in items))
                if len(lines) >= 500:
                    self.transport.write(b")\r\n".join(lines) + b")\r\n")
                    lines = []
                    if self._flow.outputFull:  # a client that does not read holds us up
                        await self._flow.drained()
                continue
            batch.append((seq, u, message))
            batchBytes += message.size + overhead
            if batchBytes >= READ_BATCH:
                missing |= await self._fetchBatch(view, batch, items)
                batch, batchBytes = [], 0
        if lines:
            self.transport.write(b")\r\n".join(lines) + b")\r\n")
        if batch:
            missing |= await self._fetchBatch(view, batch, items)
        return missing

    async def _respondFlagColumns(self, view: SelectedFolder, spans: list, items: list,
                                  column: list) -> None:
        """FETCH of UID and FLAGS only, the view in step with the folder (so sequence
        number n is the n-th of the folder's flag column): slices of the view's uids and
        of the column, one C{bytes %} per message through C-level maps, no per-message
        Python call (``UID FETCH 1:* (FLAGS)`` on 100,000).  Made and written a chunk at
        a time: the client reads one while the next is made."""
        uids, recent = view.uids, view.recent
        wire = {f: response.flagList(f) for start, stop in spans for f in set(column[start:stop])}
        if recent:
            wire.update({f | _RECENT: response.flagList(f | _RECENT) for f in list(wire)})
        line = (b"* %d FETCH (" + b" ".join(b"UID %d" if item.name == b"UID" else b"FLAGS %s"
                                            for item in items) + b")\r\n").__mod__
        for start, stop in spans:
            view.toldMany(uids[start:stop], column[start:stop])
            for at in range(start, stop, _COLUMN_CHUNK):
                end = min(at + _COLUMN_CHUNK, stop)
                flagSets = column[at:end]
                if recent:
                    flagSets = [f | _RECENT if u in recent else f
                                for u, f in zip(uids[at:end], flagSets, strict=True)]
                columns = [uids[at:end] if item.name == b"UID" else map(wire.__getitem__, flagSets)
                           for item in items]
                self.transport.write(b"".join(map(line, zip(range(at + 1, end + 1), *columns,
                                                            strict=True))))
                if self._flow.outputFull:  # a client that does not read holds us up
                    await self._flow.drained()

    def _flags(self, view: SelectedFolder, message) -> frozenset:
        return message.flags | {"\\Recent"} if message.uid in view.recent else message.flags

    async def _fetchBatch(self, view: SelectedFolder, batch: list, items: list) -> bool:
        datas = await _readEach(view.mailbox, [u for _, u, _ in batch])
        flags = [self._flags(view, m) for _, _, m in batch]
        # Parsing MIME structure is CPU work: off the reactor thread, like the reads.
        lines = await threads.deferToThread(_renderBatch, batch, datas, items, flags, self.utf8)
        for line in lines:
            self._send(line)
            if self._flow.outputFull:
                await self._flow.drained()
        return any(data is None for data in datas)

    async def cmd_STORE(self, tag, args, uid: bool = False):
        args.sp()
        targets = self._targets(args, uid)
        args.sp()
        unchangedSince = condstore.parseStoreModifier(args)
        item = args.atom().upper()
        args.sp()
        flags = self._storableFlags(args.flagList())
        args.end()
        silent = item.endswith(b".SILENT")
        mode = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}.get(
            item[:-len(b".SILENT")] if silent else item)
        if mode is None:
            raise _Bad(b"STORE takes FLAGS, +FLAGS or -FLAGS")
        view = self.selected
        if view.readOnly:
            raise _No(b"[READ-ONLY] Mailbox is read-only")
        keywords = {f for f in flags if not f.startswith("\\")}
        limit = view.mailbox.maxKeywords
        if limit is not None and len(set(view.mailbox.keywords()) | keywords) > limit:
            raise _No(b"[LIMIT] Too many keywords in this mailbox (at most %d)" % limit)
        seqOf = dict((u, s) for s, u in targets)
        modified: list[int] = []
        if unchangedSince is None:
            updated = await view.mailbox.setFlags(list(seqOf), flags, mode)
        else:
            mailbox = self._modseqMailbox()
            self._enableCondstore()
            # RFC 7162 §3.1.3: checked and stored atomically; the others are MODIFIED.
            updated, modified = await mailbox.setFlagsUnchangedSince(list(seqOf), flags, mode,
                                                                     unchangedSince)
        for line in view.newKeywords():
            self._send(line)
        for message in updated:
            view.told(message.uid, message.flags)
            what = [b"UID %d" % message.uid] if uid else []
            if not silent:
                what.append(b"FLAGS " + view.flagList(message))
            if self.condstore:
                what.append(b"MODSEQ (%d)" % message.modseq)  # even when SILENT (§3.1.3)
            if len(what) > (1 if uid else 0):
                self._send(b"* %d FETCH (" % seqOf[message.uid] + b" ".join(what) + b")")
        code = b""
        if modified:
            code = b"[MODIFIED %s] " % response.rangeSet(
                response.runs(modified if uid else sorted(seqOf[u] for u in modified)))
        self._ok(tag, code + b"STORE completed", expunge=uid)

    async def cmd_COPY(self, tag, args, uid: bool = False, move: bool = False):
        args.sp()
        targets = self._targets(args, uid)
        args.sp()
        name = self._mailbox(args)
        args.end()
        view = self.selected
        if move and view.readOnly:
            raise _No(b"[READ-ONLY] Mailbox is read-only")
        try:
            target = await self.account.openFolder(name)
        except NoSuchFolder:
            raise _No(b"[TRYCREATE] No such mailbox") from None
        self.factory.settleRecent(self.user, target)  # copies are \Recent there, as appends
        uids = [u for _, u in targets if view.mailbox.message(u) is not None]
        if not uids:
            self._ok(tag, (b"MOVE" if move else b"COPY") + b" completed: nothing to do")
            return
        if not move:  # a MOVE within the account changes no usage
            await self._reserveQuota(sum(view.mailbox.message(u).size for u in uids), len(uids))
        pairs = await self._forgetQuotaOnFailure(view.mailbox.copyMessages(uids, target))
        code = b"[COPYUID %d %s %s]" % (target.uidValidity, response.sequenceSet([a for a, _ in pairs]),
                                        response.sequenceSet([b for _, b in pairs]))
        if not move:
            self._ok(tag, code + b" COPY completed")
            return
        # RFC 6851 §4.3: COPYUID in an untagged OK, then the EXPUNGEs, then the tagged OK.
        self._send(b"* OK " + code + b" Moved")
        await view.mailbox.remove(uids)
        self.factory.quota.forget(self.user)
        self._ok(tag, b"MOVE completed")

    def cmd_MOVE(self, tag, args, uid: bool = False):
        return self.cmd_COPY(tag, args, uid, move=True)

    async def cmd_SEARCH(self, tag, args, uid: bool = False):
        view = self.selected
        args.sp()
        options = esearch.parseReturn(args)
        save = options is not None and b"SAVE" in options
        try:
            search.parseCharset(args)
            key = search.parseKeys(args, lambda byUid: view.largestUid() if byUid else len(view),
                                   lambda: self.searchResult)  # "$" here is the one saved before
        except search.BadCharset:
            if save:
                self.searchResult = []  # RFC 5182 §2.1: a SEARCH ... SAVE answered NO empties "$"
            raise
        withModSeq = search.usesModSeq(key)
        if withModSeq:
            self._modseqMailbox()
            self._enableCondstore()  # RFC 7162 §3.1: a CONDSTORE enabling command
        if save:
            self.searchResult = []  # (and so does one that fails from here on)
        found = await self._matching(view, key)
        numbers = [c.uid if uid else c.seq for c in found]
        if options is None:
            line = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
            if withModSeq and found:
                # RFC 7162 §3.1.5: the highest modseq of the messages found.
                line += b" (MODSEQ %d)" % max(c.message.modseq for c in found)
            self._send(line)
        else:
            line = esearch.answer(tag, options, numbers, uid)
            if line is not None:
                self._send(line)
            if b"SAVE" in options:
                self.searchResult = esearch.saved(options, [c.uid for c in found])
        self._ok(tag, b"SEARCH completed", expunge=uid)

    async def cmd_SORT(self, tag, args, uid: bool = False):
        """RFC 5256 §3: SORT (criteria) charset keys; ties in mailbox order."""
        args.sp()
        criteria = sort.parseCriteria(args)
        described = await self._described(args)
        ordered = sort.sortMessages(described, criteria)
        self._send(b"* SORT" + b"".join(b" %d" % (d.uid if uid else d.seq) for d in ordered))
        self._ok(tag, b"SORT completed", expunge=uid)

    async def cmd_THREAD(self, tag, args, uid: bool = False):
        """RFC 5256 §4: THREAD algorithm charset keys."""
        args.sp()
        algorithm = args.atom().upper()
        if algorithm not in thread.ALGORITHMS:
            raise _Bad(b"Unknown threading algorithm " + algorithm[:32])
        described = await self._described(args)
        build = thread.references if algorithm == b"REFERENCES" else thread.orderedSubject
        self._send(b"* THREAD " + thread.render(build(described), uid))
        self._ok(tag, b"THREAD completed", expunge=uid)

    async def _described(self, args: Arguments) -> list:
        """SP charset SP search keys (RFC 5256 §3), evaluated: what SORT and THREAD order
        the found messages by, read from their headers in a worker thread."""
        view = self.selected
        args.sp()
        search.charsetArgument(args)
        key = search.parseKeys(args, lambda byUid: view.largestUid() if byUid else len(view),
                               lambda: self.searchResult)
        found = await self._matching(view, key)
        described = []
        for start in range(0, len(found), 200):
            chunk = found[start:start + 200]
            datas = await _readEach(view.mailbox, [c.uid for c in chunk])
            described += await threads.deferToThread(_describeChunk, chunk, datas)
        return described

    async def _matching(self, view: SelectedFolder, key) -> list:
        """The candidates of the selected folder that C{key} matches, in order."""
        candidates = []
        for seq, u in enumerate(list(view.uids), 1):
            message = view.message(u)  # RFC 2180 §4.1: expunged elsewhere still counts
            if message is not None:
                candidates.append(search.Candidate(seq, u, message, u in view.recent))
        if not key.needsData:
            found = []
            for start in range(0, len(candidates), SEARCH_SLICE):
                if start:
                    # Up to MAX_KEYS keys per message on the reactor thread: let the
                    # other connections in between slices of a large folder.
                    from twisted.internet import reactor

                    await task.deferLater(reactor, 0, lambda: None)
                found += [c for c in candidates[start:start + SEARCH_SLICE] if key.match(c)]
        else:
            found = []
            for start in range(0, len(candidates), 200):
                datas = await _readEach(view.mailbox, [c.uid for c in candidates[start:start + 200]])
                # A message whose text has gone (expunged elsewhere) matches no text key.
                readable = [(c, d) for c, d in zip(candidates[start:start + 200], datas, strict=True)
                            if d is not None]
                found += await threads.deferToThread(_searchChunk, key, readable)
        return found

    async def cmd_IDLE(self, tag, args):
        """RFC 2177: push updates until the client says DONE."""
        args.end()
        self._send(b"+ idling")
        view = self.selected
        if view is not None:
            self._flushUpdates(expunge=True)
            view.onChange = self._pushUpdates
            # Pick up anything a refresh has not reported yet (another program's writes).
            view.mailbox.refresh().addErrback(
                lambda f: self._selectedGone() if f.check(NoSuchFolder) else None)
        try:
            line = await self._nextLine()
        finally:
            if view is not None:
                view.onChange = None
        text = b"".join(p for p in line.parts if isinstance(p, bytes)).strip()
        if text.upper() != b"DONE":
            raise _Bad(b"Expected DONE")
        self._ok(tag, b"IDLE terminated")

    def _pushUpdates(self) -> None:
        if self.selected is not None and not self.transport.disconnecting:
            self._flushUpdates(expunge=True)


async def _readEach(mailbox, uids: list) -> list:
    """The messages' bytes, in order; None for each one that has gone (expunged by
    another session, which this session may not be told of yet: RFC 3501 §7.4.1)."""
    present = [u for u in uids if mailbox.message(u) is not None]
    try:
        datas = dict(zip(present, await mailbox.readMessages(present), strict=True))
    except NoSuchMessage:
        datas = {}
        for u in present:  # one went meanwhile: read the others one by one
            try:
                datas[u] = (await mailbox.readMessages([u]))[0]
            except NoSuchMessage:
                pass
    return [datas.get(u) for u in uids]


def _renderBatch(batch: list, datas: list, items: list, flags: list, utf8: bool) -> list:
    """Worker thread: FETCH response lines (RFC 2180 §4.1.2: NIL text for one that has gone;
    C{utf8}: the session enabled UTF8=ACCEPT, RFC 6855)."""
    lines = []
    for (seq, _, message), data, messageFlags in zip(batch, datas, flags, strict=True):
        if data is None:
            lines.append(b"* %d FETCH (" % seq + b" ".join(
                fetch.renderGone(i, message, messageFlags) for i in items) + b")")
            continue
        parsed = fetch.Parsed(data)
        # Distinct items can still overlap (BODY[]<0.N>, BODY[]<1.N>, ...): a response
        # is at most twice the message (BODY[] and RFC822 both, say) plus 1 MiB, so
        # a 25 MB message cannot become gigabytes of memory.
        budget = 2 * len(data) + 1024 * 1024
        rendered = []
        for i in items:
            rendered.append(fetch.render(i, message, parsed, messageFlags, utf8))
            budget -= len(rendered[-1])
            if budget < 0:
                raise _No(b"[LIMIT] FETCH response too large: fetch fewer items at once")
        lines.append(b"* %d FETCH (" % seq + b" ".join(rendered) + b")")
    return lines


def _searchChunk(key, chunk: list) -> list:
    """Worker thread: the candidates of C{chunk} ((candidate, bytes) pairs) that match."""
    found = []
    for candidate, data in chunk:
        candidate.data = data
        if key.match(candidate):
            found.append(candidate)
        candidate.data = None
        candidate._root = candidate._text = candidate._decoded = None
    return found


def _describeChunk(chunk: list, datas: list) -> list:
    """Worker thread: what SORT and THREAD order each candidate of C{chunk} by."""
    return [sort.describe(c, d) for c, d in zip(chunk, datas, strict=True)]


_ANY = ("unauth", "auth", "select")
_AUTH = ("auth", "select")
_COMMANDS: dict[bytes, tuple[Callable, tuple]] = {
    b"CAPABILITY": (IMAPServer.cmd_CAPABILITY, _ANY),
    b"NOOP": (IMAPServer.cmd_NOOP, _ANY),
    b"LOGOUT": (IMAPServer.cmd_LOGOUT, _ANY),
    b"ID": (IMAPServer.cmd_ID, _ANY),
    b"LOGIN": (IMAPServer.cmd_LOGIN, ("unauth",)),
    b"STARTTLS": (IMAPServer.cmd_STARTTLS, ("unauth",)),
    b"AUTHENTICATE": (IMAPServer.cmd_AUTHENTICATE, ("unauth",)),
    b"ENABLE": (IMAPServer.cmd_ENABLE, _AUTH),
    b"COMPRESS": (IMAPServer.cmd_COMPRESS, _AUTH),
    b"SELECT": (IMAPServer.cmd_SELECT, _AUTH),
    b"EXAMINE": (IMAPServer.cmd_EXAMINE, _AUTH),
    b"CREATE": (IMAPServer.cmd_CREATE, _AUTH),
    b"DELETE": (IMAPServer.cmd_DELETE, _AUTH),
    b"RENAME": (IMAPServer.cmd_RENAME, _AUTH),
    b"SUBSCRIBE": (IMAPServer.cmd_SUBSCRIBE, _AUTH),
    b"UNSUBSCRIBE": (IMAPServer.cmd_UNSUBSCRIBE, _AUTH),
    b"LIST": (IMAPServer.cmd_LIST, _AUTH),
    b"LSUB": (IMAPServer.cmd_LSUB, _AUTH),
    b"NAMESPACE": (IMAPServer.cmd_NAMESPACE, _AUTH),
    b"STATUS": (IMAPServer.cmd_STATUS, _AUTH),
    b"APPEND": (IMAPServer.cmd_APPEND, _AUTH),
    b"GETQUOTA": (IMAPServer.cmd_GETQUOTA, _AUTH),
    b"GETQUOTAROOT": (IMAPServer.cmd_GETQUOTAROOT, _AUTH),
    b"SETQUOTA": (IMAPServer.cmd_SETQUOTA, _AUTH),
    b"IDLE": (IMAPServer.cmd_IDLE, _AUTH),
    b"CHECK": (IMAPServer.cmd_CHECK, ("select",)),
    b"CLOSE": (IMAPServer.cmd_CLOSE, ("select",)),
    b"UNSELECT": (IMAPServer.cmd_UNSELECT, ("select",)),
    b"EXPUNGE": (IMAPServer.cmd_EXPUNGE, ("select",)),
    b"SEARCH": (IMAPServer.cmd_SEARCH, ("select",)),
    b"SORT": (IMAPServer.cmd_SORT, ("select",)),
    b"THREAD": (IMAPServer.cmd_THREAD, ("select",)),
    b"FETCH": (IMAPServer.cmd_FETCH, ("select",)),
    b"STORE": (IMAPServer.cmd_STORE, ("select",)),
    b"COPY": (IMAPServer.cmd_COPY, ("select",)),
    b"MOVE": (IMAPServer.cmd_MOVE, ("select",)),
}


class IMAPFactory(protocol.ServerFactory):
    """Builds IMAP connections; holds what they share (config, portal, \\Recent claims)."""

    protocol = IMAPServer
    noisy = False

    def __init__(self, config, portal, spoolDir: str, limiter: ConnectionLimiter | None = None,
                 clock: Callable[[], float] = time.time, security: Security | None = None,
                 quota: QuotaTracker | None = None) -> None:
        self.config = config
        self.quota = quota or QuotaTracker(None, _NoQuotas(), Quota())
        self.portal = portal
        self.security = security or Security()
        self.spoolDir = spoolDir
        self.limiter = limiter
        self.specialUse = dict(config["special_use"])
        self._recent: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._startTime = clock()

    def buildProtocol(self, addr):
        return admit(self.limiter, addr, b"* BYE [UNAVAILABLE] ", self._build)

    def _build(self):
        p = self.protocol()
        p.factory = self
        return p

    def avatar(self, account) -> defer.Deferred:
        """Realm adapter for IMailAccount: the session works on the account itself."""
        return defer.succeed((account, lambda: None))

    async def ensureSpecialUse(self, account) -> None:
        """Create (and subscribe) missing special-use folders at login, as Dovecot's auto=subscribe."""
        if not self.specialUse:
            return
        existing = set(await account.listFolders())
        for name in self.specialUse:
            if name not in existing:
                try:
                    await account.createFolder(name)
                except FolderExists:
                    pass
                await account.setSubscribed(name, True)

    def _claimedUpTo(self, user: str, mailbox) -> tuple[tuple, int]:
        """\\Recent belongs to one session (RFC 3501 §2.3.2): the highest UID given out so far.

        Kept in memory, per account, folder and UIDVALIDITY (a folder deleted and
        created again starts afresh), for the L{MAX_RECENT_FOLDERS} folders used
        last.  The first time a folder is seen (after a restart, or after it was
        forgotten), what arrived before the server started is not recent.
        """
        key = (user, mailbox.name, mailbox.uidValidity)
        claimed = self._recent.get(key)
        if claimed is None:
            claimed = 0
            for uid in reversed(mailbox.uids()):
                message = mailbox.message(uid)
                if message is not None and message.internalDate < int(self._startTime):
                    claimed = uid
                    break
            self._recent[key] = claimed
            while len(self._recent) > MAX_RECENT_FOLDERS:
                self._recent.popitem(last=False)
        self._recent.move_to_end(key)
        return key, claimed

    def settleRecent(self, user: str, mailbox) -> None:
        """Before adding messages: what the folder holds now is settled, so what is
        added is \\Recent whatever its INTERNALDATE."""
        self._claimedUpTo(user, mailbox)

    def claimRecent(self, user: str, mailbox, uids, take: bool = True) -> set:
        """The C{uids} (ascending) still \\Recent; a SELECT session takes them (C{take}),
        EXAMINE only looks."""
        key, claimed = self._claimedUpTo(user, mailbox)
        recent = set(uids[bisect.bisect_right(uids, claimed):])
        if recent and take:
            self._recent[key] = uids[-1]
        return recent

    def countRecent(self, user: str, mailbox) -> int:
        """STATUS (RECENT): messages no SELECT session has taken yet."""
        key, claimed = self._claimedUpTo(user, mailbox)
        uids = mailbox.uids()
        return len(uids) - bisect.bisect_right(uids, claimed)


class _NoQuotas:
    """Accounts for a factory built without a quota tracker: nobody has a quota."""

    def quota(self, account: str) -> None:
        return None
