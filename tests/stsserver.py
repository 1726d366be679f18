"""An MTA-STS policy server on loopback for relay tests (twisted.web over TLS).

    policy = startPolicyServer(certs)      # certs for mta-sts.<domain>
    policy.resource.body = b"version: STSv1\\r\\nmode: enforce\\r\\n..."
    policy.resource.mode = "redirect"      # or "stream" (endless body), "hang" (no answer)
    ... [relay] mta_sts_port = policy.port
"""

from __future__ import annotations

from dataclasses import dataclass, field

from support import freePort, onReactor
from twisted.internet import defer, reactor
from twisted.names import dns
from twisted.web import resource, server

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmax_age: 86400\r\n"


def TXT(text: str) -> dns.Record_TXT:
    """An _mta-sts record with TTL 0: never cached, so a test may change it."""
    return dns.Record_TXT(text.encode(), ttl=0)


class PolicyResource(resource.Resource):
    """/.well-known/mta-sts.txt as the test says: ``mode`` is ok, redirect, stream, hang."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.code = 200
        self.body = POLICY
        self.contentType = b"text/plain; charset=utf-8"
        self.requests: list[bytes] = []  # the Host: of each request
        self.arrived = defer.Deferred()  # fires at the first request
        self.closed = defer.Deferred()  # fires when the first request's connection ends
        self.streamed = 0

    def render_GET(self, request):
        self.requests.append(request.getHeader(b"host"))
        if not self.arrived.called:
            self.arrived.callback(None)
        request.notifyFinish().addBoth(lambda _: self.closed.called or self.closed.callback(None))
        if request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"not here"
        if self.mode == "redirect":
            request.setResponseCode(301)
            request.setHeader(b"location", b"https://mta-sts.sts.test/other.txt")
            return b""
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.contentType)
        if self.mode == "stream":
            self._stream(request)
            return server.NOT_DONE_YET
        if self.mode == "hang":
            return server.NOT_DONE_YET
        return self.body

    def _stream(self, request) -> None:
        """Policy-shaped lines for ever, until the client goes away."""
        if self.closed.called:
            return
        chunk = b"mx: mx.sts.test\r\n" * 512
        request.write(chunk)
        self.streamed += len(chunk)
        reactor.callLater(0.001, self._stream, request)


@dataclass
class PolicyServer:
    port: int
    resource: PolicyResource
    listening: object = field(repr=False)

    def stop(self) -> None:
        onReactor(self.listening.stopListening)


def startPolicyServer(certs) -> PolicyServer:
    policy = PolicyResource()
    port = freePort()
    listening = onReactor(reactor.listenSSL, port, server.Site(policy), certs.serverOptions(),
                          interface="127.0.0.1")
    return PolicyServer(port, policy, listening)
