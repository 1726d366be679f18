# -*- test-case-name: tests.test_web -*-
"""The web listeners' site: one resource tree, bounded requests, counted connections."""

from __future__ import annotations

from collections.abc import Callable

from twisted.protocols import policies
from twisted.web import http, pages, resource, server

from twistmail.acmechallenges import ChallengeTokens
from twistmail.protocols.limits import ConnectionLimiter, admit
from twistmail.web import acmechallenge, autoconfig, mtasts
from twistmail.web.base import notFound

#: Seconds a connection may last in all (a policy fetch is one small request); also
#: the idle timeout.  Slow or dribbling clients are cut off here.
CONNECTION_DEADLINE = 30
#: Request line plus headers, and their number (Twisted's defaults: 16 KiB and 500).
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 50
#: Request bodies: Autodiscover's (a few hundred octets) and the admin forms'.
MAX_BODY = 4096


class Tree(resource.Resource):
    """A node of the tree: only its children are served; itself and anything unknown are 404."""

    def getChild(self, path: bytes, request) -> resource.IResource:
        return pages.notFound()

    def render(self, request) -> bytes:
        return notFound(request)


def buildRoot(mtaSts: dict, hosted: Callable[[str], bool],
              clients: autoconfig.ClientSettings | None = None,
              challenges: ChallengeTokens | None = None,
              admin: resource.IResource | None = None) -> resource.Resource:
    """Every path served; anything not put here is a 404.

    @param mtaSts: the ``[mta_sts]`` section.
    @param hosted: whether a domain is one of ours.
    @param clients: what autoconfiguration tells mail clients; None serves none.
    @param challenges: the ACME HTTP-01 tokens of orders in flight; None serves none.
    @param admin: the web admin (L{twistmail.web.admin}); None serves none.
    """
    root = Tree()
    wellKnown = Tree()
    root.putChild(b".well-known", wellKnown)
    if mtaSts["mode"]:
        wellKnown.putChild(mtasts.WELL_KNOWN[1], mtasts.PolicyResource(
            mtasts.policyText(mtaSts["mode"], mtaSts["mx"], mtaSts["max_age"]), hosted))
    if challenges is not None:
        wellKnown.putChild(acmechallenge.WELL_KNOWN[1],
                           acmechallenge.ChallengeResource(challenges))
    if clients is not None:
        autoconfig.addTo(root, clients, hosted, Tree)
    if admin is not None:
        root.putChild(b"admin", admin)
    return root


class _BoundedRequest(server.Request):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._bodySize = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._bodySize += len(data)
        if self._bodySize > MAX_BODY:
            self.channel.transport.abortConnection()
            return
        super().handleContentChunk(data)


class _Channel(http.HTTPChannel):
    """HTTP/1.1 only (no h2 negotiation), with smaller header limits."""

    totalHeadersSize = MAX_HEADER_BYTES
    maxHeaders = MAX_HEADERS


class Site(server.Site):
    protocol = _Channel
    requestFactory = _BoundedRequest
    noisy = False

    def __init__(self, root: resource.Resource) -> None:
        super().__init__(root, timeout=CONNECTION_DEADLINE)
        self.displayTracebacks = False


class _Deadline(policies.ProtocolWrapper):
    """Aborts the connection CONNECTION_DEADLINE seconds after it opened."""

    _timer = None

    def makeConnection(self, transport) -> None:
        self._timer = self.factory.clock.callLater(self.factory.deadline, self._expired)
        super().makeConnection(transport)

    def _expired(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connectionLost(reason)


class WebFactory(policies.WrappingFactory):
    """The site behind the shared connection limits and a whole-connection deadline."""

    protocol = _Deadline
    noisy = False

    def __init__(self, site: Site, limiter: ConnectionLimiter | None = None, clock=None,
                 deadline: float = CONNECTION_DEADLINE) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        super().__init__(site)
        self.limiter = limiter
        self.clock = clock
        self.deadline = deadline

    def buildProtocol(self, addr):
        return admit(self.limiter, addr, b"HTTP/1.1 503 Service Unavailable\r\n"
                     b"Connection: close\r\nContent-Type: text/plain\r\n\r\n",
                     lambda: super(WebFactory, self).buildProtocol(addr))
