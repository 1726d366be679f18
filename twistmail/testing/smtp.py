# -*- test-case-name: tests.test_filters -*-
"""Policy tests without sockets: an SMTP server over StringTransport, with fakes.

L{SMTPHarness} builds a real L{SMTPFactory} (the same protocol, transaction
and filter chain as a listener) with a L{task.Clock}, recipients from a fixed
list and a L{RecordingDeliveryTarget}, and talks to it one command at a time::

    h = SMTPHarness([MyFilter()])
    c = h.connect()
    c.command(b"EHLO client.example")
    c.command(b"MAIL FROM:<x@remote.test>")
    c.command(b"RCPT TO:<alice@example.test>")
    c.command(b"DATA")
    assert c.data(b"Subject: hi\\r\\n\\r\\nhello\\r\\n").startswith(b"250 ")
    [delivered] = h.delivered
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from twistmail import config as configmod
from twistmail.auth.accounts import NotLocal, UnknownUser
from twistmail.delivery.routing import RelayPolicy, Router
from twistmail.filters.chain import ConfiguredFilter
from twistmail.interfaces import IDeliveryTarget
from twistmail.model import Envelope


@dataclasses.dataclass(frozen=True)
class Delivered:
    envelope: Envelope
    data: bytes  # the message as it would be stored


@implementer(IDeliveryTarget)
class RecordingDeliveryTarget:
    """Keeps every message delivered to it, in order; C{failure} makes it fail instead."""

    def __init__(self) -> None:
        self.delivered: list[Delivered] = []
        self.failure: Exception | None = None

    def deliver(self, envelope, source) -> defer.Deferred:
        if self.failure is not None:
            return defer.fail(self.failure)
        self.delivered.append(Delivered(envelope, source.getvalue()))
        return defer.succeed(None)


class StaticAccounts:
    """The part of L{twistmail.auth.accounts.Accounts} routing uses, from a fixed list."""

    def __init__(self, users: Iterable[str]) -> None:
        self.users = {u.lower() for u in users}
        self.domains = {u.rpartition("@")[2] for u in self.users}

    def route(self, address: str, delimiter: str = "+") -> list[str]:
        local, _, domain = address.lower().rpartition("@")
        if domain not in self.domains:
            raise NotLocal(address)
        for candidate in (f"{local}@{domain}", f"{local.split(delimiter, 1)[0]}@{domain}"
                          if delimiter else ""):
            if candidate in self.users:
                return [candidate]
        raise UnknownUser(address)


class Conversation:
    """One client connection; each call returns what the server wrote meanwhile."""

    def __init__(self, proto, transport: StringTransport, greeting: bytes) -> None:
        self.proto = proto
        self.transport = transport
        self.greeting = greeting

    def output(self) -> bytes:
        """What the server wrote since the last call, without the final CRLF."""
        value = self.transport.value()
        self.transport.clear()
        return value.rstrip(b"\r\n")

    def command(self, line: bytes) -> bytes:
        """Send one command line; the last line of the reply (b"" if none yet)."""
        self.proto.dataReceived(line + b"\r\n")
        return self.output().rpartition(b"\r\n")[2]

    def data(self, message: bytes) -> bytes:
        """After DATA's 354: the message (dot-stuffed here) and its end."""
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line
                               for line in message.split(b"\r\n"))
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        return self.command(stuffed + b".")

    def close(self) -> None:
        self.proto.connectionLost(None)


class SMTPHarness:
    """An inbound or submission SMTP server over StringTransport, with C{filters}."""

    def __init__(self, filters: Sequence = (), role: str = "inbound",
                 users: Iterable[str] = ("alice@example.test", "bob@example.test"),
                 delivery=None, hostname: str = "mx.example.test", spoolDir: str | None = None,
                 trustedNetworks: Sequence[str] = (), showClient: bool = True,
                 smtp: dict | None = None) -> None:
        """@param filters: L{IMessageFilter} providers (timeout and on_failure as
            defaults) or L{ConfiguredFilter}s, in order.
        @param spoolDir: where a message over 1 MiB spills (None: kept in memory).
        @param smtp: ``[smtp]`` keys to override."""
        from twistmail.protocols.smtp import SMTPFactory

        self.clock = task.Clock()
        self.delivery = delivery if delivery is not None else RecordingDeliveryTarget()
        self.threadCalls = 0
        config = configmod.load(None, {"smtp": smtp or {}})
        self.factory = SMTPFactory(
            config["smtp"], hostname, Router(StaticAccounts(users), RelayPolicy(trustedNetworks)),
            self.delivery, spoolDir, submission=role == "submission",
            filters=tuple(f if isinstance(f, ConfiguredFilter) else ConfiguredFilter(f.name, f)
                          for f in filters),
            clock=self.clock, runInThread=self._inThread, showClient=showClient)

    @property
    def delivered(self) -> list[Delivered]:
        return self.delivery.delivered

    def _inThread(self, f, *args) -> defer.Deferred:
        """Counted and run at once: the tests see that disk work is handed off."""
        self.threadCalls += 1
        return defer.maybeDeferred(f, *args)

    def connect(self, client: str = "192.0.2.1", authenticated: str | None = None) -> Conversation:
        """A new connection from C{client}; C{authenticated} as if SMTP AUTH succeeded."""
        peer = IPv4Address("TCP", client, 40000)
        proto = self.factory.buildProtocol(peer)
        proto.callLater = self.clock.callLater  # idle timeouts on our clock
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        greeting = transport.value().rstrip(b"\r\n")
        transport.clear()
        if authenticated:
            proto.authenticated = True
            proto.client = dataclasses.replace(proto.client, authenticated=authenticated)
            proto._session.authenticated(authenticated)
        return Conversation(proto, transport, greeting)
