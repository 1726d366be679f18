"""A receiving SMTP server for relay tests whose replies the test scripts.

It listens on loopback (any 127.0.0.0/8 address or ::1), records every
transaction it acknowledged with 250, and answers as ``script`` says::

    sink = startSink()                      # 127.0.0.1, a free port
    sink.script.rcpt = lambda rcpt: "550 5.1.1 no such user" if "bad" in rcpt else None
    sink.script.data = lambda msg: "451 4.3.0 try later"
    ...
    sink.messages  -> [Received(sender, recipients, data, tls, user)]

``None`` from a script function means the usual 250.  STARTTLS is offered
when a certificate is given, AUTH PLAIN when ``users`` is.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

from support import onReactor
from twisted.internet import defer, protocol, reactor
from twisted.protocols import basic


@dataclass
class Received:
    sender: str
    recipients: list
    data: bytes
    tls: bool
    user: str | None
    peer: str  # the client's address
    local: str  # the address the client connected to


@dataclass
class Script:
    greeting: str = "220 sink.test ESMTP"
    mail: Callable[[str], str | None] = lambda sender: None
    rcpt: Callable[[str], str | None] = lambda rcpt: None
    data: Callable[[Received], str | None] = lambda received: None
    #: when set, the reply after DATA waits until this Deferred fires
    hold: defer.Deferred | None = None
    tlsOptions: object = None
    users: dict = field(default_factory=dict)
    #: AUTH only after STARTTLS (as a submission server would)
    authNeedsTLS: bool = True
    #: drop the connection right after acknowledging a message (a server that times out
    #: idle clients between transactions)
    closeAfterMessage: bool = False
    #: EHLO keywords offered once under TLS ("REQUIRETLS", RFC 8689 §2)
    tlsExtensions: tuple = ()
    #: more EHLO keywords to offer ("SMTPUTF8", ...)
    extensions: list = field(default_factory=list)


class SinkProtocol(basic.LineReceiver):
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.sink = self.factory.sink
        self.sink.connections += 1
        self.sink.active += 1
        self.sink.maxActive = max(self.sink.maxActive, self.sink.active)
        self.tls = self.factory.implicitTLS
        self.user = None
        self.authPending = False
        self.lost = False
        self.waiting = None  # lines received while a DATA reply is held
        self.reset()
        self.reply(self.sink.script.greeting)

    def connectionLost(self, reason):
        self.sink.active -= 1
        self.lost = True
        if not self.sink.active:
            waiters, self.sink.closedWaiters = self.sink.closedWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def reset(self):
        self.sender = None
        self.recipients = []
        self.lines = None

    def reply(self, text: str):
        self.sink.transcript.append(("S", text))
        self.sendLine(text.encode())
        if text.startswith(("421", "221")):
            self.transport.loseConnection()

    def lineReceived(self, line: bytes):
        if self.waiting is not None:
            return self.waiting.append(line)
        if self.lines is not None:
            return self.dataLine(line)
        if self.authPending:
            self.authPending = False
            return self.checkPlain(line.decode("ascii", "replace"))
        self.sink.transcript.append(("C", line.decode("utf-8", "replace")))
        verb, _, rest = line.decode("utf-8", "replace").partition(" ")
        handler = getattr(self, "do_" + verb.upper(), None)
        if handler is None:
            return self.reply("502 5.5.1 unknown command")
        handler(rest)

    def do_EHLO(self, rest):
        script = self.sink.script
        caps = ["250-sink.test", "250-PIPELINING", "250-8BITMIME",
                *(f"250-{keyword}" for keyword in script.extensions)]
        if script.tlsOptions is not None and not self.tls:
            caps.append("250-STARTTLS")
        if script.users and (self.tls or not script.authNeedsTLS):
            caps.append("250-AUTH PLAIN")
        if self.tls:
            caps += [f"250-{keyword}" for keyword in script.tlsExtensions]
        caps.append("250 ENHANCEDSTATUSCODES")
        self.reply("\r\n".join(caps))

    def do_HELO(self, rest):
        self.reply("250 sink.test")

    def do_STARTTLS(self, rest):
        self.reply("220 2.0.0 go ahead")
        self.transport.startTLS(self.sink.script.tlsOptions)
        self.tls = True
        self.reset()

    def do_AUTH(self, rest):
        mechanism, _, initial = rest.partition(" ")
        if mechanism.upper() != "PLAIN" or not self.sink.script.users:
            return self.reply("504 5.5.4 unsupported mechanism")
        if not initial:
            self.authPending = True
            return self.reply("334 ")
        self.checkPlain(initial)

    def checkPlain(self, encoded: str):
        try:
            _, user, password = base64.b64decode(encoded).decode().split("\0")
        except ValueError:
            return self.reply("501 5.5.2 bad encoding")
        if self.sink.script.users.get(user) == password:
            self.user = user
            return self.reply("235 2.7.0 authenticated")
        self.reply("535 5.7.8 authentication failed")

    def do_MAIL(self, rest):
        sender = rest.partition(":")[2].strip().split(" ")[0].strip("<>")
        answer = self.sink.script.mail(sender)
        if answer:
            return self.reply(answer)
        self.sender = sender
        self.reply("250 2.1.0 Ok")

    def do_RCPT(self, rest):
        rcpt = rest.partition(":")[2].strip()
        rcpt = rcpt[1:-1] if rcpt.startswith("<") and rcpt.endswith(">") else rcpt
        answer = self.sink.script.rcpt(rcpt)
        if answer:
            return self.reply(answer)
        self.recipients.append(rcpt)
        self.reply("250 2.1.5 Ok")

    def do_DATA(self, rest):
        if not self.recipients:
            return self.reply("503 5.5.1 no valid recipients")
        self.lines = []
        self.reply("354 go ahead")

    def dataLine(self, line: bytes):
        if line != b".":
            self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        received = Received(self.sender, self.recipients, b"".join(x + b"\r\n" for x in self.lines),
                            self.tls, self.user, self.transport.getPeer().host,
                            self.transport.getHost().host)
        self.reset()
        self.sink.dataSeen.append(received)
        hold = self.sink.script.hold
        d = defer.Deferred() if hold is None else hold
        d.addCallback(lambda _: self.finish(received))
        if hold is None:
            d.callback(None)
        else:
            self.waiting = []  # pipelined commands wait: replies go out in order (RFC 2920)

    def finish(self, received: Received):
        if self.lost:
            return  # nothing can be acknowledged on a dead connection
        answer = self.sink.script.data(received)
        if not answer:
            self.sink.messages.append(received)
        self.reply(answer or "250 2.0.0 Ok: queued")
        if self.sink.script.closeAfterMessage:
            self.transport.loseConnection()
            return
        waiting, self.waiting = self.waiting, None
        for line in waiting or ():  # then the commands that came after the data
            self.lineReceived(line)

    def do_RSET(self, rest):
        self.reset()
        self.reply("250 2.0.0 Ok")

    def do_NOOP(self, rest):
        self.reply("250 2.0.0 Ok")

    def do_QUIT(self, rest):
        self.reply("221 2.0.0 Bye")

    def rawDataReceived(self, data):  # pragma: no cover - never in raw mode
        pass


class SinkFactory(protocol.ServerFactory):
    protocol = SinkProtocol
    noisy = False

    def __init__(self, sink, implicitTLS: bool = False):
        self.sink = sink
        self.implicitTLS = implicitTLS


@dataclass
class Sink:
    script: Script
    ports: list = field(default_factory=list)
    messages: list = field(default_factory=list)  # acknowledged with 250
    dataSeen: list = field(default_factory=list)  # every DATA received, acknowledged or not
    transcript: list = field(default_factory=list)
    connections: int = 0
    active: int = 0
    maxActive: int = 0
    closedWaiters: list = field(default_factory=list)

    def allClosed(self) -> defer.Deferred:
        """(On the reactor) fires once no client is connected."""
        if not self.active:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self.closedWaiters.append(waiter)
        return waiter

    @property
    def port(self) -> int:
        return self.ports[0].getHost().port

    def stop(self) -> None:
        onReactor(lambda: defer.gatherResults([defer.maybeDeferred(p.stopListening)
                                               for p in self.ports]))
        self.ports = []

    def listen(self, port: int, interface: str, implicitTLS=None) -> None:
        """@param implicitTLS: server TLS options for SMTPS (TLS from the first byte), or None."""
        factory = SinkFactory(self, implicitTLS is not None)
        if implicitTLS is not None:
            self.ports.append(onReactor(reactor.listenSSL, port, factory, implicitTLS,
                                        interface=interface))
        else:
            self.ports.append(onReactor(reactor.listenTCP, port, factory, interface=interface))


def startSink(port: int = 0, interfaces=("127.0.0.1",), script: Script | None = None,
              implicitTLS=None) -> Sink:
    sink = Sink(script or Script())
    for interface in interfaces:
        sink.listen(port, interface, implicitTLS)
        port = sink.port
    return sink
