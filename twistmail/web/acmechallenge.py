# -*- test-case-name: tests.test_acme -*-
"""The HTTP-01 responder (RFC 8555 §8.3): ``/.well-known/acme-challenge/<token>``.

Only a token an order in flight put into L{ChallengeTokens} is answered, for
any Host (the CA asks on each name of the order); anything else is a 404, so
the path can name nothing else: no file is ever read.
"""

from __future__ import annotations

from twistmail.acmechallenges import ChallengeTokens
from twistmail.web.base import ReadOnly, notFound

#: The path under the web root (RFC 8555 §8.3).
WELL_KNOWN = (b".well-known", b"acme-challenge")


class ChallengeResource(ReadOnly):
    """The key authorization of a known token, as the CA expects it; 404 otherwise."""

    def __init__(self, tokens: ChallengeTokens) -> None:
        super().__init__()
        self.tokens = tokens

    def render_GET(self, request) -> bytes:
        # postpath is what followed /.well-known/acme-challenge/, already split on "/"
        # and percent-decoded: exactly one segment, checked against the alphabet.
        if len(request.postpath) != 1:
            return notFound(request)
        try:
            token = request.postpath[0].decode("ascii")
        except UnicodeDecodeError:
            return notFound(request)
        answer = self.tokens.get(token)
        if answer is None:
            return notFound(request)
        request.setHeader(b"content-type", b"application/octet-stream")  # RFC 8555 §8.3
        return answer.encode("ascii")
