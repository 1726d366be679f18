"""A raw IMAP client for protocol tests: exact bytes out, logical lines (literals inlined) back."""

from __future__ import annotations

import itertools
import re
import socket
import time

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\r\n$")


class RawIMAP:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.tags = (f"t{n}".encode() for n in itertools.count(1))
        self.greeting = self.line()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawIMAP:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fill(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; have {self.buf[:500]!r}")
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; have {self.buf[:500]!r}")
        self.buf += chunk

    def line(self, timeout: float = 10.0) -> bytes:
        """One response line, with any literals it carries inlined (without CRLF at the end)."""
        deadline = time.monotonic() + timeout
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill(deadline)
            end = self.buf.index(b"\r\n") + 2
            piece, self.buf = self.buf[:end], self.buf[end:]
            m = _LITERAL_AT_END.search(piece)
            if not m:
                return out + piece[:-2]
            size = int(m.group(1))
            while len(self.buf) < size:
                self._fill(deadline)
            out += piece + self.buf[:size]
            self.buf = self.buf[size:]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: bytes | str, timeout: float = 10.0) -> tuple[list[bytes], bytes]:
        """Send C{tag text}; return (untagged and continuation lines, the tagged line)."""
        if isinstance(text, str):
            text = text.encode()
        tag = next(self.tags)
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag, timeout)

    def until(self, tag: bytes, timeout: float = 10.0) -> tuple[list[bytes], bytes]:
        untagged = []
        while True:
            line = self.line(timeout)
            if line.startswith(tag + b" "):
                return untagged, line[len(tag) + 1:]
            untagged.append(line)

    def ok(self, text: bytes | str, timeout: float = 10.0) -> list[bytes]:
        untagged, tagged = self.command(text, timeout)
        assert tagged.startswith(b"OK"), (text, untagged, tagged)
        return untagged

    def login(self, user: str = "alice@example.test", password: str = "secret") -> None:
        self.ok(f'LOGIN "{user}" "{password}"')

    def append(self, message: bytes, flags: str = "", date: str | None = None,
               folder: str = "INBOX") -> list[bytes]:
        """APPEND with LITERAL+; C{date} is an INTERNALDATE such as ``01-Jan-2020 10:00:00 +0000``."""
        when = b' "%s"' % date.encode() if date else b""
        return self.ok(b"APPEND %s (%s)%s {%d+}\r\n" % (folder.encode(), flags.encode(), when,
                                                       len(message)) + message)


def loggedIn(port: int, user: str = "alice@example.test") -> RawIMAP:
    client = RawIMAP(port)
    client.login(user)
    return client
