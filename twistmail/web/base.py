"""What every resource of the web listener shares."""

from __future__ import annotations

from twisted.web import pages, resource


class ReadOnly(resource.Resource):
    """A leaf answering GET and HEAD (``render_GET``); any other method is a 405."""

    isLeaf = True

    def render(self, request) -> bytes:
        # Twisted's own 405 page is deprecated (unescaped HTML): answer it here.
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")  # RFC 9110 §15.5.6
            return pages.errorPage(405, "Method Not Allowed", "Only GET and HEAD.").render(request)
        if request.method == b"HEAD":
            return self.render_GET(request)
        return super().render(request)


def notFound(request) -> bytes:
    return pages.notFound().render(request)
