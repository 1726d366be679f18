# -*- test-case-name: tests.test_pop3 -*-
"""POP3 (RFC 1939, RFC 2449) on Twisted's POP3 server, over IMailbox.

Changes to ``twisted.mail.pop3.POP3`` and why:

* Greeting without an APOP timestamp: passwords are stored hashed, so APOP
  (which needs the plaintext) cannot work and clients must not try it.
* CAPA lists what works, spelled as RFC 2449 does (``PIPELINING``, not
  Twisted's ``PIPELINE``), plus RESP-CODES so ``[IN-USE]``/``[AUTH]`` mean something.
* Message content is byte-stuffed across chunk boundaries (Twisted stuffs per
  16 KiB chunk and rewrites every LF to CRLF, which corrupts CRLF-stored mail).
* Malformed commands get ``-ERR`` with a reason instead of a logged traceback.
* QUIT answers ``+OK`` only after the deletions are on disk (RFC 1939 §6).
* UTF8 (RFC 6856 §2): before login the client may switch the session to
  UTF-8; messages whose header fields hold raw UTF-8 (SMTPUTF8 mail) are sent
  as stored then, and downgraded (L{twistmail.protocols.downgrade}) to a
  client that has not asked, which RFC 6856 §2 leaves to the server, in a
  worker thread (a crafted header can take a while).  (Dovecot
  offers no UTF8 and sends such messages as they are.)  LIST, STAT and the RETR
  status line give the stored size either way: a downgraded header is a
  little longer, as RFC 1939 allows the count to be approximate.  Bodies are
  sent as stored (8-bit or binary), never converted to 7-bit: POP3 has no
  way to say what a client can take, and every client reads 8-bit.
* **Flow control** (L{flow.Flow}): received lines wait in a queue and are
  handled one at a time, none while a command is outstanding or while the
  client leaves our answers unread; reading stops when more than
  L{MAX_PIPELINED} octets wait.  Twisted read them all, and replayed the
  commands held behind a slow login straight into C{processCommand}: the first
  error became an unhandled error in a Deferred, the rest were dropped.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections import deque

from twisted.cred import error as credError
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, protocol, threads
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.python.failure import Failure
from zope.interface import implementer

from twistmail._logtext import loggable
from twistmail.auth.checkers import fromClient
from twistmail.errors import AccountsUnavailable
from twistmail.protocols import downgrade
from twistmail.protocols.flow import Flow
from twistmail.protocols.limits import ConnectionLimiter, admit
from twistmail.protocols.security import Security, isSecure, listenerHost
from twistmail.protocols.tcp import sendAtOnce

log = Logger()

#: Messages up to this size are read whole in one worker-thread trip; larger ones stream.
WHOLE_MESSAGE = 1024 * 1024
CHUNK = 256 * 1024
#: Bytes of the following messages read along with the one a RETR asks for.
READ_AHEAD = 1024 * 1024
#: Octets of pipelined commands read ahead of the one in progress.  POP3 commands
#: are a few octets each and each may be answered with a whole message, so far
#: fewer than SMTP's or IMAP's are worth holding.
MAX_PIPELINED = 16 * 1024


class MailboxInUse(credError.LoginDenied):
    """Another POP3 session holds this maildrop (RFC 2449 [IN-USE])."""


@implementer(pop3.IMailbox)
class POP3Mailbox:
    """Twisted's pop3.IMailbox over our IMailbox: a snapshot taken at login."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.snapshot = list(folder.messages())
        self.deleted: set[int] = set()
        self._position = {m.uid: i for i, m in enumerate(self.snapshot)}
        self._readAhead: dict[int, bytes] = {}

    def read(self, message) -> bytes | defer.Deferred:
        """The bytes of C{message} (at most WHOLE_MESSAGE), reading ahead of it.

        Clients retrieve in order (fetchmail, mbsync, poplib loops), so the
        messages that follow are read in the same worker-thread trip, up to
        READ_AHEAD bytes, and the next RETRs are answered from memory at once.
        """
        data = self._readAhead.get(message.uid)
        if data is not None:
            return data
        batch, total = [message], message.size
        for following in itertools.islice(self.snapshot, self._position[message.uid] + 1, None):
            total += following.size
            if total > READ_AHEAD or len(batch) >= 256:
                break
            batch.append(following)

        def keep(datas: list[bytes]) -> bytes:
            self._readAhead = {m.uid: d for m, d in zip(batch, datas, strict=True)}
            return datas[0]

        self._readAhead = {}
        return self.folder.readMessages([m.uid for m in batch]).addCallback(keep)

    def _msg(self, i: int):
        if not isinstance(i, int) or i < 0 or i >= len(self.snapshot):
            raise ValueError(i)
        return self.snapshot[i]

    def find(self, number: bytes):
        """The message numbered C{number} (1-based, as on the wire) unless deleted, else None."""
        i = int(number) - 1 if number.isdigit() else -1
        if 0 <= i < len(self.snapshot) and i not in self.deleted:
            return self.snapshot[i]
        return None

    def live(self) -> list[tuple[int, object]]:
        """(1-based number, message) of every message not marked deleted."""
        return [(n + 1, m) for n, m in enumerate(self.snapshot) if n not in self.deleted]

    def listMessages(self, i=None):
        if i is None:
            return [0 if n in self.deleted else m.size for n, m in enumerate(self.snapshot)]
        self._msg(i)
        return 0 if i in self.deleted else self.snapshot[i].size

    def getMessage(self, i: int):
        return self.folder.openMessage(self._msg(i).uid)

    def getUidl(self, i: int) -> bytes:
        return self._msg(i).uniqueId.encode("ascii", "replace")

    def deleteMessage(self, i: int) -> None:
        self._msg(i)
        if i in self.deleted:
            raise ValueError(i)
        self.deleted.add(i)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> defer.Deferred:
        uids = [self.snapshot[i].uid for i in sorted(self.deleted)]
        if not uids:
            return defer.succeed([])
        return self.folder.remove(uids)


class POP3Server(pop3.POP3):
    AUTH_CMDS = [*pop3.POP3.AUTH_CMDS, b"STLS", b"UTF8"]
    #: Whether the client sent UTF8 (RFC 6856 §2): messages are then sent undowngraded.
    utf8 = False

    _flow: Flow | None = None
    _processing = False

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)
        self._idle = self.timeOut = self.factory.config["timeout"]
        self.MAX_LENGTH = self.factory.config["max_line_length"]
        self.peerHost = getattr(self.transport.getPeer(), "host", "unknown")
        self.secure = isSecure(self.transport)
        self.magic = b""
        self._lines: deque[bytes | None] = deque()  # None: a line too long came
        self._queued = 0  # octets in _lines
        self._flow = Flow(self.transport, lambda: self._idle, drained=self._resume,
                          activity=self.resetTimeout, clock=self, expired=self.timeoutConnection,
                          name="pop3")
        self.successResponse(b"twistmail POP3 server ready")
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason) -> None:
        if self._flow is not None:
            self._flow.lost()
        super().connectionLost(reason)

    def closeConnection(self) -> None:
        """Close once the client has read our answers, or abort if it has not within
        the idle timeout: C{loseConnection} alone would wait forever."""
        self._flow.close(self._idle)

    def timeoutConnection(self) -> None:
        """Idle too long, or a line not completed in time (L{Flow.received}): a client
        that has not read our answers either is aborted."""
        self.setTimeout(None)
        self.failResponse(b"Disconnected for inactivity")
        self._buffer = b""
        self._lines.clear()
        self._queued = 0
        self._flow.close(self._idle, abort=self._flow.outputFull)

    @property
    def buffered(self) -> int:
        """Octets received and not yet handled."""
        return self._queued + len(self._buffer)

    def listCapabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE", b"UTF8"]
        if not self.mbox:
            if self._passwordsAllowed():
                caps += [b"USER", b"SASL PLAIN"]  # RFC 2595 §4: not before STLS otherwise
            if not self.secure and self.factory.security.tls is not None:
                caps.append(b"STLS")
        return caps + [b"IMPLEMENTATION twistmail"]

    def _passwordsAllowed(self) -> bool:
        return self.factory.security.passwordsAllowed(
            self.peerHost, listenerHost(self.transport), self.secure)

    def do_UTF8(self) -> None:
        """RFC 6856 §2: UTF-8 mode, only in the AUTHORIZATION state."""
        if self.mbox:
            self.failResponse(b"UTF8 only before login (RFC 6856 section 2)")
            return
        self.utf8 = True
        self.successResponse(b"UTF8 enabled")

    def do_STLS(self) -> None:
        """RFC 2595 §4.  Lines the client pipelined after STLS in plaintext are dropped,
        never read as commands over TLS (CVE-2011-0411)."""
        if self.mbox or self.secure:
            self.failResponse(b"STLS only before login and only once")
            return
        if self.factory.security.tls is None:
            self.failResponse(b"TLS is not available")
            return
        self.successResponse(b"Begin TLS negotiation now")
        self._buffer = b""
        self._lines.clear()
        self._queued = 0
        self._flow.startTLS(self.factory.security.tls)
        self.secure = True

    # -- framing: a queue of lines, one command at a time -----------------------------

    def dataReceived(self, data: bytes) -> None:
        self._flow.received(data)
        if self._lines and self._lines[-1] is None:
            return  # closing: a line was too long
        lines = (self._buffer + data).split(self.delimiter)
        self._buffer = lines.pop()
        self._lines.extend(lines)
        self._queued += sum(map(len, lines)) + len(self.delimiter) * len(lines)
        if len(self._buffer) > self.MAX_LENGTH:
            self._buffer = b""
            self._lines.append(None)
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._lines and self.blocked is None and not self._flow.outputFull \
                    and not self.transport.disconnecting:
                line = self._lines.popleft()
                if line is None or len(line) > self.MAX_LENGTH:
                    self._lines.clear()
                    self._queued = 0
                    self.lineLengthExceeded(line or b"")
                    break
                self._queued -= len(line) + len(self.delimiter)
                self.lineReceived(line)
        finally:
            self._processing = False
            self._flow.backlog(self.buffered > MAX_PIPELINED)

    def _resume(self) -> None:
        """The client has read our answers, or a command finished: go on."""
        if not self._processing:
            self._process()

    def _longOperation(self, d: defer.Deferred) -> defer.Deferred:
        """Twisted's, but the commands sent meanwhile stay queued as lines and go
        through L{state_COMMAND} like any other (Twisted replayed them bare)."""
        self.setTimeout(None)
        self.blocked = []

        def done(result) -> None:
            self.blocked = None
            if isinstance(result, Failure) and not result.check(ConnectionDone):
                log.failure("pop3 command failed", result)
            if not self._flow.stopped:
                self.setTimeout(self._idle)
                self._resume()

        return d.addBoth(done)

    def _refusePlaintext(self) -> bool:
        if self._passwordsAllowed():
            return False
        log.info("pop3 login client={client} result=refused: no TLS", client=self.peerHost)
        self.failResponse(b"[AUTH] Passwords only over TLS: use STLS first")
        return True

    def do_USER(self, user) -> None:
        if not self._refusePlaintext():
            super().do_USER(user)

    def do_AUTH(self, mechanism=None, initial=None) -> defer.Deferred | None:
        """RFC 5034 AUTH PLAIN, with or without an initial response."""
        if mechanism is None:
            self.transport.write(pop3.successResponse(b"") + b"PLAIN\r\n.\r\n")
            return None
        if mechanism.upper() != b"PLAIN":
            self.failResponse(b"Unsupported SASL mechanism")
            return None
        if self._refusePlaintext():
            return None
        if initial is None:
            self.state = "SASL"
            self.sendLine(b"+ ")
            return None
        return self._saslResponse(initial)

    def state_SASL(self, line: bytes) -> None:
        self.state = "COMMAND"
        if line.strip() == b"*":
            self.failResponse(b"Authentication cancelled")
            return
        self._saslResponse(line.strip())

    def _saslResponse(self, encoded: bytes) -> defer.Deferred | None:
        try:
            authz, user, password = base64.b64decode(b"" if encoded == b"=" else encoded,
                                                     validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            self.failResponse(b"Malformed PLAIN response")
            return None
        if authz and authz != user:
            self.failResponse(b"[AUTH] Cannot act as another user")
            return None
        self._loginUser = user[:256]
        d = defer.maybeDeferred(self.authenticateUserPASS, user, password)
        d.addCallbacks(self._cbMailbox, self._ebMailbox, callbackArgs=(user,))
        d.addErrback(self._ebUnexpected)
        return self._longOperation(d)

    def authenticateUserPASS(self, user: bytes, password: bytes) -> defer.Deferred:
        return self.portal.login(fromClient(UsernamePassword(user, password), self.peerHost, "pop3"),
                                 None, pop3.IMailbox)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.failResponse(b"Line too long")
        self.closeConnection()

    def state_COMMAND(self, line: bytes) -> None:
        command, *args = line.split(b" ") if line else [b""]
        if not command.isalnum() or not command.isascii():
            self.failResponse(b"Unknown command")
            return
        try:
            return self.processCommand(command, *args)
        except TypeError:
            self.failResponse(b"Wrong number of arguments for " + command.upper())
        except (ValueError, IndexError):
            self.failResponse(b"No such message")
        except pop3.POP3Error as e:
            self.failResponse(e.args[0] if e.args and isinstance(e.args[0], bytes) else b"Error")

    def processCommand(self, command: bytes, *args):
        if self.blocked is None and command.upper() not in self.AUTH_CMDS and not self.mbox:
            raise pop3.POP3Error(b"Not authenticated: send USER and PASS first")
        return super().processCommand(command, *args)

    def do_APOP(self, user, digest) -> None:
        self.failResponse(b"APOP is not supported: use USER/PASS")

    def do_PASS(self, password, *words) -> defer.Deferred | None:
        # Twisted's do_PASS does not block pipelined commands while the (threaded)
        # password check runs, so a pipelined RETR would be refused as "not
        # authenticated": run it as a long operation instead.
        if self._refusePlaintext():
            return None
        if self._userIs is None:
            self.failResponse(b"USER required before PASS")
            return None
        user, self._userIs = self._userIs, None
        self._loginUser = user[:256]
        d = defer.maybeDeferred(self.authenticateUserPASS, user, b" ".join((password,) + words))
        d.addCallbacks(self._cbMailbox, self._ebMailbox, callbackArgs=(user,))
        d.addErrback(self._ebUnexpected)
        return self._longOperation(d)

    # RFC 1939 §5: messages marked as deleted are not counted or listed.
    def do_STAT(self) -> None:
        live = self.mbox.live()
        self.successResponse(b"%d %d" % (len(live), sum(m.size for _, m in live)))

    def do_LIST(self, i=None) -> None:
        if i is not None:
            return self._scanListing(i, lambda n, m: b"%d %d" % (n, m.size))
        live = self.mbox.live()
        self.transport.write(pop3.successResponse(b"%d messages" % len(live)) + b"".join(
            b"%d %d\r\n" % (n, m.size) for n, m in live) + b".\r\n")

    def do_UIDL(self, i=None) -> None:
        if i is not None:
            return self._scanListing(i, lambda n, m: b"%d %s" % (n, m.uniqueId.encode()))
        self.transport.write(pop3.successResponse(b"") + b"".join(
            b"%d %s\r\n" % (n, m.uniqueId.encode()) for n, m in self.mbox.live()) + b".\r\n")

    def _scanListing(self, i: bytes, fmt) -> None:
        found = self.mbox.find(i)
        if found is None:
            self.failResponse(b"No such message")
        else:
            self.successResponse(fmt(int(i), found))

    def _cbMailbox(self, result, user) -> None:
        super()._cbMailbox(result, user)
        log.info("pop3 login user={user} client={client} result=ok",
                 user=loggable(user), client=self.peerHost)

    def _ebMailbox(self, failure) -> None:
        user = loggable(getattr(self, "_loginUser", b""))
        if failure.check(MailboxInUse):
            log.info("pop3 login user={user} client={client} result=refused: mailbox in use",
                     user=user, client=self.peerHost)
            self.failResponse(b"[IN-USE] Mailbox is locked by another POP3 session")
            return
        if failure.check(AccountsUnavailable):
            log.info("pop3 login user={user} client={client} result=tempfail: accounts "
                     "unavailable", user=user, client=self.peerHost)
            self.failResponse(b"[SYS/TEMP] Temporary authentication failure, try again later")
            return
        failure.trap(credError.LoginDenied, credError.LoginFailed)
        log.info("pop3 login user={user} client={client} result=failed",
                 user=user, client=self.peerHost)
        self.failResponse(b"[AUTH] Authentication failed")

    def do_DELE(self, i) -> None:
        try:
            self.mbox.deleteMessage(int(i) - 1)
        except ValueError:
            self.failResponse(b"No such message")
        else:
            self.successResponse(b"Message deleted")

    def do_QUIT(self) -> defer.Deferred | None:
        if not self.mbox:
            self.successResponse(b"Bye")
            self.closeConnection()
            return None
        mbox, self.mbox = self.mbox, None

        def done(removed) -> None:
            self.successResponse(b"Bye")
            self.closeConnection()

        def failed(failure) -> None:
            log.failure("pop3 QUIT could not remove messages", failure)
            self.failResponse(b"[SYS/TEMP] Some deleted messages not removed")
            self.closeConnection()

        return self._longOperation(defer.maybeDeferred(mbox.sync).addCallbacks(done, failed))

    def do_RETR(self, i) -> defer.Deferred | None:
        return self._sendMessage(i, None)

    def do_TOP(self, i, n) -> defer.Deferred | None:
        if not n.isdigit():
            self.failResponse(b"Bad line count argument")
            return None
        return self._sendMessage(i, int(n))

    def _sendMessage(self, i: bytes, topLines: int | None) -> defer.Deferred | None:
        """RETR / TOP: small messages in one read, larger ones streamed in chunks."""
        message = self.mbox.find(i)
        if message is None:
            self.failResponse(b"No such message")
            return None
        self._highest = max(self._highest, int(i))
        status = b"%d octets" % message.size if topLines is None else b"Top of message follows"
        body = _Body(topLines, legacy=not self.utf8)

        def render(data: bytes) -> bytes:
            return pop3.successResponse(status) + body.feed(data) + body.end()

        def send(data: bytes) -> defer.Deferred | None:
            if self.utf8 or not _eightBitHeader(data):
                self.transport.write(render(data))
                return None
            # Downgrading is CPU work (a crafted header can take seconds): in a thread.
            return threads.deferToThread(render, data).addCallback(self.transport.write)

        if message.size <= WHOLE_MESSAGE:
            data = self.mbox.read(message)
            if isinstance(data, bytes):
                d = send(data)  # read ahead: no trip to read it
                if d is None:
                    return None
            else:
                d = data.addCallback(send)
        else:
            d = self.mbox.folder.openMessage(message.uid).addCallback(
                lambda fp: defer.Deferred.fromCoroutine(_stream(
                    self.transport, self._flow, fp, pop3.successResponse(status), body)))
        d.addErrback(self._retrieveFailed, message.uid)
        return self._longOperation(d)

    def _retrieveFailed(self, failure, uid: int) -> None:
        if failure.check(ConnectionDone):
            return
        log.failure("pop3 could not read message uid={uid}", failure, uid=uid)
        if failure.check(_MidMessage):
            self.closeConnection()  # a half-sent message cannot be answered with -ERR
        else:
            self.failResponse(b"[SYS/TEMP] Cannot read that message now")




class _MidMessage(Exception):
    """Reading failed after part of the message was sent."""


class _Body:
    """The bytes of a RETR or TOP response, produced from the message in pieces.

    RFC 1939 §3: a dot is doubled at the start of *any* line (after CRLF or a
    bare LF), so no stored byte sequence can make a lenient client see an
    early end; the response ends with CRLF.CRLF.  For TOP, output stops after
    the header, the blank line and C{topLines} lines of the body.

    For a C{legacy} client (no UTF8 command) the header is held back until
    it is complete (at most L{MAX_HEADER} octets: a longer one is sent as it
    is) and sent downgraded if it holds 8-bit octets.
    """

    #: Octets of header held back for downgrading; Dovecot's limit for one header block.
    MAX_HEADER = 1024 * 1024

    def __init__(self, topLines: int | None = None, legacy: bool = False) -> None:
        self.head: bytes | None = b"" if legacy else None  # the header held back
        self.atLineStart = True
        self.last = b""
        self.remaining = topLines
        self.inBody = False
        self.line = b""  # TOP: the start of a line not yet ended
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.head is not None:
            chunk = self._downgrade(chunk)
        if self.remaining is not None:
            chunk = self._top(chunk)
        if not chunk:
            return b""
        if self.atLineStart and chunk[:1] == b".":
            chunk = b"." + chunk
        chunk = chunk.replace(b"\n.", b"\n..")
        self.atLineStart = chunk.endswith(b"\n")
        self.last = (self.last + chunk)[-2:]
        return chunk

    def _top(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        pos = 0
        while True:
            if self.inBody and self.remaining == 0:
                self.done = True
                return chunk[:pos]
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                self.line += chunk[pos:]
                return chunk
            line, self.line = self.line + chunk[pos:nl + 1], b""
            if self.inBody:
                self.remaining -= 1
            elif line in (b"\r\n", b"\n"):
                self.inBody = True
            pos = nl + 1

    def _downgrade(self, chunk: bytes, final: bool = False) -> bytes:
        head = self.head + chunk
        end = _headerEnd(head)
        if end < 0 and not final and len(head) <= self.MAX_HEADER:
            self.head = head
            return b""
        self.head = None
        if end < 0:
            return downgrade.header(head) if final else head
        return downgrade.header(head[:end]) + head[end:]

    def end(self) -> bytes:
        rest = self.feed(self._downgrade(b"", final=True)) if self.head is not None else b""
        return rest + (b"\r\n" if self.last and self.last != b"\r\n" else b"") + b".\r\n"


def _eightBitHeader(data: bytes) -> bool:
    """Whether the header of the message C{data} holds 8-bit octets (to downgrade)."""
    end = _headerEnd(data)
    return not (data if end < 0 else data[:end]).isascii()


def _headerEnd(data: bytes) -> int:
    """Where the body starts (after the first empty line), or -1 if not yet seen."""
    if data.startswith((b"\r\n", b"\n")):
        return 2 if data.startswith(b"\r") else 1
    ends = [i + len(blank) for blank in (b"\n\r\n", b"\n\n") if (i := data.find(blank)) >= 0]
    return min(ends, default=-1)


async def _stream(transport, flow: Flow, fp, status: bytes, body: _Body) -> None:
    """Send a large message a chunk at a time, each read in a worker thread once the
    client has taken the one before (a client that does not read holds us up)."""
    try:
        first = status
        while True:
            await flow.drained()
            try:
                chunk = await threads.deferToThread(fp.read, CHUNK)
            except Exception as e:
                if first:
                    raise
                raise _MidMessage(e) from e
            if body.head is not None:  # downgrading the header (CPU work) is still to come
                data = first + await threads.deferToThread(body.feed, chunk)
            else:
                data = first + body.feed(chunk)
            first = b""
            if not chunk or body.done:
                end = body.end() if body.head is None else await threads.deferToThread(body.end)
                transport.write(data + end)
                return
            transport.write(data)
    finally:
        fp.close()


class POP3ServerFactory(protocol.ServerFactory):
    """Builds POP3 connections and keeps the [IN-USE] lock set."""

    protocol = POP3Server
    noisy = False

    def __init__(self, config, portal, limiter: ConnectionLimiter | None = None,
                 security: Security | None = None) -> None:
        self.config = config
        self.portal = portal
        self.limiter = limiter
        self.security = security or Security()
        self.inUse: set[str] = set()

    def buildProtocol(self, addr):
        return admit(self.limiter, addr, b"-ERR [SYS/TEMP] ", self._build)

    def _build(self):
        p = self.protocol()
        p.factory = self
        p.portal = self.portal
        return p

    def avatar(self, account) -> defer.Deferred:
        """Realm adapter for pop3.IMailbox: lock the maildrop, open INBOX."""
        if account.name in self.inUse:
            return defer.fail(MailboxInUse())
        self.inUse.add(account.name)

        def opened(folder):
            return POP3Mailbox(folder), lambda: self.inUse.discard(account.name)

        def failed(failure):
            self.inUse.discard(account.name)
            return failure

        return account.openFolder("INBOX").addCallbacks(opened, failed)
