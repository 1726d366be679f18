# -*- test-case-name: tests.test_metrics -*-
"""The ``[listen] metrics`` listener: ``GET /metrics`` for Prometheus, and nothing else.

The exposition is prometheus_client's Twisted resource (a WSGI app in the
reactor's thread pool) over the server's own registry.  Every other path is
404, every method but GET 405; the web listener's limits apply
(L{twistmail.web.site}: header sizes, a 30 s connection deadline).
"""

from __future__ import annotations

from twisted.web import resource

from twistmail.metrics import Metrics
from twistmail.web.base import methodNotAllowed, notFound
from twistmail.web.site import Tree


class MetricsPage(resource.Resource):
    """``GET /metrics`` exactly: prometheus_client's resource would answer any path
    below it, and reflect any method's name in its 405 page."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        from prometheus_client.twisted import MetricsResource  # imports the reactor

        super().__init__()
        self._exposition = MetricsResource(metrics.registry)

    def render(self, request) -> bytes | int:
        if request.postpath not in ([], [b""]):
            return notFound(request)
        if request.method != b"GET":  # its WSGI app answers GET only, HEAD included
            return methodNotAllowed(request, b"GET")
        return self._exposition.render(request)


def buildRoot(metrics: Metrics) -> resource.Resource:
    root = Tree()
    root.putChild(b"metrics", MetricsPage(metrics))
    return root
