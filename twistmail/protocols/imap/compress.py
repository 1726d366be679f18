# -*- test-case-name: tests.test_imap_compress -*-
"""COMPRESS=DEFLATE (RFC 4978): raw deflate (RFC 1951) both ways, above TLS.

Output: each write is compressed and ended with a sync flush (RFC 4978 §4:
the client must be able to act on every response as it arrives), then goes
to the real transport (TLS encrypts what deflate produced, as §3 asks).

Input is inflated at most L{CHUNK} octets at a time, and only when the
command reader has read what it had (L{Inflater.pending} counts towards the
server's backlog, so the transport stops reading meanwhile), L{PER_TURN}
octets per reactor turn: a decompression bomb meets the same line and
literal limits as plain input, never more memory or a blocked reactor.
"""

from __future__ import annotations

import zlib

#: Inflated octets handed to the command reader at once.
CHUNK = 64 * 1024
#: Inflated octets per reactor turn: a bomb (1 MB inflating to 1 GB) does not hold
#: the reactor for seconds; the rest waits for the next turn.
PER_TURN = 16 * CHUNK
#: RFC 4978 §4: raw deflate, no zlib header or checksum; a 32 KiB window.
_WBITS = -15


class Inflater:
    """The client's compressed stream, inflated on demand."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(_WBITS)
        self._tail = b""
        self._full = False  # the last call stopped at CHUNK: more may come without input

    def feed(self, data: bytes) -> None:
        self._tail += data

    @property
    def pending(self) -> int:
        """Compressed octets received and not yet inflated."""
        return len(self._tail) + (1 if self._full else 0)

    def take(self) -> bytes:
        """Up to L{CHUNK} inflated octets (b"" when nothing is pending).

        @raise zlib.error: the client's stream is not deflate (the caller closes).
        """
        if not self._tail and not self._full:
            return b""
        out = self._inflate.decompress(self._tail, CHUNK)
        self._tail = self._inflate.unconsumed_tail
        self._full = len(out) == CHUNK
        if self._inflate.eof:
            # The client ended its stream (a final block): nothing may follow it.
            raise zlib.error("compressed stream ended")
        return out


class DeflatingTransport:
    """Stands in for the transport: writes are compressed, everything else passes."""

    def __init__(self, transport) -> None:
        self._transport = transport
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, _WBITS)

    def write(self, data: bytes) -> None:
        self._transport.write(self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH))

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def __getattr__(self, name: str):
        return getattr(self._transport, name)
