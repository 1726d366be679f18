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
"""

from __future__ import annotations

from twisted.cred import error as credError
from twisted.internet import defer, protocol, threads
from twisted.logger import Logger
from twisted.mail import pop3
from zope.interface import implementer

from twistmail.protocols.limits import ConnectionLimiter

log = Logger()


class MailboxInUse(credError.LoginDenied):
    """Another POP3 session holds this maildrop (RFC 2449 [IN-USE])."""


@implementer(pop3.IMailbox)
class POP3Mailbox:
    """Twisted's pop3.IMailbox over our IMailbox: a snapshot taken at login."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.snapshot = list(folder.messages())
        self.deleted: set[int] = set()

    def _msg(self, i: int):
        if not isinstance(i, int) or i < 0 or i >= len(self.snapshot):
            raise ValueError(i)
        return self.snapshot[i]

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
    def connectionMade(self) -> None:
        self.timeOut = self.factory.config["timeout"]
        self.MAX_LENGTH = self.factory.config["max_line_length"]
        self.peerHost = getattr(self.transport.getPeer(), "host", "unknown")
        self.magic = b""
        self.successResponse(b"twistmail POP3 server ready")
        self.setTimeout(self.timeOut)

    def listCapabilities(self) -> list[bytes]:
        return [b"TOP", b"USER", b"UIDL", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE",
                b"IMPLEMENTATION twistmail"]

    def lineLengthExceeded(self, line: bytes) -> None:
        self.failResponse(b"Line too long")
        self.transport.loseConnection()

    def state_COMMAND(self, line: bytes) -> None:
        command, *args = line.split(b" ") if line else [b""]
        if not command.isalpha():
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
        n = int(i) if i.isdigit() else 0
        found = dict(self.mbox.live()).get(n)
        if found is None:
            self.failResponse(b"No such message")
        else:
            self.successResponse(fmt(n, found))

    def _cbMailbox(self, result, user) -> None:
        super()._cbMailbox(result, user)
        log.info("pop3 login user={user} client={client} result=ok",
                 user=user.decode("utf-8", "replace"), client=self.peerHost)

    def _ebMailbox(self, failure) -> None:
        user = getattr(self, "_loginUser", b"").decode("utf-8", "replace")
        if failure.check(MailboxInUse):
            log.info("pop3 login user={user} client={client} result=refused: mailbox in use",
                     user=user, client=self.peerHost)
            self.failResponse(b"[IN-USE] Mailbox is locked by another POP3 session")
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
            self.transport.loseConnection()
            return None
        mbox, self.mbox = self.mbox, None

        def done(removed) -> None:
            self.successResponse(b"Bye")
            self.transport.loseConnection()

        def failed(failure) -> None:
            log.failure("pop3 QUIT could not remove messages", failure)
            self.failResponse(b"[SYS/TEMP] Some deleted messages not removed")
            self.transport.loseConnection()

        return self._longOperation(defer.maybeDeferred(mbox.sync).addCallbacks(done, failed))

    def do_RETR(self, i) -> defer.Deferred:
        return self._sendMessage(i, lambda data: data, lambda size: b"%d octets" % size)

    def do_TOP(self, i, n) -> defer.Deferred | None:
        try:
            lines = int(n)
            if lines < 0:
                raise ValueError(n)
        except ValueError:
            self.failResponse(b"Bad line count argument")
            return None
        return self._sendMessage(i, lambda data: _top(data, lines), lambda size: b"Top of message follows")

    def _sendMessage(self, i, transform, okText) -> defer.Deferred:
        d = self._getMessageFile(i)

        def send(info):
            if info is None:
                return None  # _getMessageFile already answered -ERR
            size, fp = info
            self._highest = max(self._highest, int(i))
            return threads.deferToThread(_readStuffed, fp, transform).addCallback(
                lambda data: self.transport.write(pop3.successResponse(okText(size)) + data))

        return self._longOperation(d.addCallback(send))


def _top(data: bytes, lines: int) -> bytes:
    """RFC 1939 TOP: the header, the blank line, then C{lines} lines of the body."""
    end = data.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end, sep = data.find(b"\n\n"), 2
    if end < 0:
        return data
    head, body = data[:end + sep], data[end + sep:]
    pos = 0
    for _ in range(lines):
        nl = body.find(b"\n", pos)
        if nl < 0:
            return data
        pos = nl + 1
    return head + body[:pos]


def _readStuffed(fp, transform) -> bytes:
    """Read, transform, dot-stuff (RFC 1939 §3) and terminate a message.

    A dot is doubled after *any* LF, not only after CRLF, so a bare LF in a
    stored message can never make a lenient client see an early end.
    """
    try:
        data = transform(fp.read())
    finally:
        fp.close()
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\n.", b"\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class POP3ServerFactory(protocol.ServerFactory):
    """Builds POP3 connections and keeps the [IN-USE] lock set."""

    protocol = POP3Server
    noisy = False

    def __init__(self, config, portal, limiter: ConnectionLimiter | None = None) -> None:
        self.config = config
        self.portal = portal
        self.limiter = limiter
        self.inUse: set[str] = set()

    def buildProtocol(self, addr):
        if self.limiter is not None:
            refusal = self.limiter.check(addr)
            if refusal:
                return self.limiter.refuse(b"-ERR [SYS/TEMP] " + refusal + b"\r\n")
        p = self.protocol()
        p.factory = self
        p.portal = self.portal
        if self.limiter is not None:
            self.limiter.track(p, addr)
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
