"""What every resource of the web listener shares."""

from __future__ import annotations

from twisted.web import pages, resource


class ReadOnly(resource.Resource):
    """A leaf answering GET and HEAD (``render_GET``); any other method is a 405."""

    isLeaf = True

    def render(self, request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return methodNotAllowed(request, b"GET", b"HEAD")
        if request.method == b"HEAD":
            return self.render_GET(request)
        return super().render(request)


def notFound(request) -> bytes:
    return pages.notFound().render(request)


def methodNotAllowed(request, *allowed: bytes) -> bytes:
    """405 with the Allow header (RFC 9110 §15.5.6), never echoing the method: Twisted's
    own 405 page is deprecated (unescaped HTML)."""
    request.setHeader(b"allow", b", ".join(allowed))
    names = " and ".join(a.decode("ascii") for a in allowed)
    return pages.errorPage(405, "Method Not Allowed", f"Only {names}.").render(request)
