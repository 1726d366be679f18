"""MessageSource: the bytes of one incoming message, shared by all its recipients.

Small messages stay in memory; past ``maxMemory`` they spill to a temp file in
the spool directory, so a 25 MiB message never sits in RAM.  The spool copy
needs no fsync: durability comes from the fsynced copy each backend writes.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

CHUNK = 64 * 1024


class MessageSource:
    """Append-only message buffer; C{prefix} (trace headers) goes before the body."""

    def __init__(self, prefix: bytes = b"", spoolDir: str | None = None,
                 maxMemory: int = 1024 * 1024) -> None:
        self.prefix = prefix
        self._chunks: list[bytes] = []
        self._memory = 0
        self._file = None
        self.spoolDir = spoolDir
        self._maxMemory = maxMemory
        self.bodySize = 0

    @property
    def size(self) -> int:
        return len(self.prefix) + self.bodySize

    def write(self, data: bytes) -> None:
        self.bodySize += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        self._memory += len(data)
        if self._memory > self._maxMemory and self.spoolDir is not None:
            os.makedirs(self.spoolDir, mode=0o700, exist_ok=True)
            self._file = tempfile.NamedTemporaryFile(dir=self.spoolDir, prefix="smtp-", delete=True)
            self._file.write(b"".join(self._chunks))
            self._chunks = []

    def chunks(self) -> Iterator[bytes]:
        """The whole message (prefix + body); safe to call from a worker thread once writing ended."""
        if self.prefix:
            yield self.prefix
        yield from self.bodyChunks()

    @property
    def inMemory(self) -> bool:
        """Reading it touches no disk (so it may be read on the reactor thread)."""
        return self._file is None

    def bodyChunks(self) -> Iterator[bytes]:
        """The message as the client sent it, without C{prefix}."""
        if self._file is None:
            yield from self._chunks
            return
        self._file.flush()
        with open(self._file.name, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def open(self, headers: bytes = b"") -> BinaryIO:
        """A new binary file of the whole message, read lazily: prefix, then
        C{headers} (header lines not yet added to the prefix), then the body."""
        if self._file is None:
            return io.BytesIO(b"".join((self.prefix, headers, *self._chunks)))
        return io.BufferedReader(_ChunkReader(itertools.chain((self.prefix, headers),
                                                              self.bodyChunks())), CHUNK)

    def getvalue(self) -> bytes:
        return b"".join(self.chunks())

    def discard(self) -> None:
        """Drop the data (disconnect mid-DATA, over-size, rejected)."""
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def fromBytes(cls, data: bytes) -> MessageSource:
        source = cls()
        source.write(data)
        return source


class _ChunkReader(io.RawIOBase):
    """A read-only raw file over an iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # a generator: closes the spool file it opened
        super().close()
