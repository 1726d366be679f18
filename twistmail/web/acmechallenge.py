# -*- test-case-name: tests.test_acme -*-
"""The HTTP-01 responder (RFC 8555 §8.3): ``/.well-known/acme-challenge/<token>``.

The ACME order runs in a thread (twistmail.acmeissuer) and puts its tokens
here; the web listener answers the CA from the reactor.  Only a token of the
base64url alphabet that an order put here is answered, for any Host (the CA
asks on each name of the order); anything else is a 404, so the path can name
nothing else: no file is ever read.
"""

from __future__ import annotations

import re
import threading

from twistmail.web.base import ReadOnly, notFound

#: The path under the web root (RFC 8555 §8.3).
WELL_KNOWN = (b".well-known", b"acme-challenge")
#: RFC 8555 §8.3: "base64url ... MUST NOT contain any characters outside the base64url
#: alphabet", with at least 128 bits of entropy (22 characters); 128 is ample.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
#: Tokens at once: one per name of an order in flight (Let's Encrypt allows 100 names).
MAX_TOKENS = 200


class ChallengeTokens:
    """token -> key authorization, written from the order's thread, read by the reactor."""

    def __init__(self, limit: int = MAX_TOKENS) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._limit = limit

    def add(self, token: str, keyAuthorization: str) -> None:
        """@raise ValueError: not a token. @raise OverflowError: the table is full."""
        if not _TOKEN.match(token):
            raise ValueError(f"the CA sent a malformed challenge token {token[:64]!r}")
        with self._lock:
            if token not in self._tokens and len(self._tokens) >= self._limit:
                raise OverflowError(f"more than {self._limit} challenges at once")
            self._tokens[token] = keyAuthorization

    def remove(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def get(self, token: str) -> str | None:
        if not _TOKEN.match(token):
            return None
        with self._lock:
            return self._tokens.get(token)


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
