"""BDAT chunks (RFC 3030 CHUNKING): counted octets instead of dot-terminated DATA.

A chunk is exactly as many octets as its BDAT command announced, whatever they
are (no dot-stuffing, no line scanning: RFC 3030 §2), so the server must read
every one of them — even of a chunk it refuses — to find the next command.
A refused chunk's octets are dropped as they arrive, never buffered.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: "BDAT" SP chunk-size [ SP "LAST" ] (RFC 3030 §3); 1 to 18 digits keep sizes in an int64.
_ARGUMENTS = re.compile(rb"^ ?([0-9]{1,18})(?: +(LAST))? *$", re.I)


def parseArguments(rest: bytes) -> tuple[int, bool]:
    """(chunk size, whether it is the LAST one); ValueError for anything else."""
    m = _ARGUMENTS.match(rest)
    if not m:
        raise ValueError(rest)
    return int(m.group(1)), m.group(2) is not None


class ChunkReader:
    """The octets of one chunk as they arrive: to C{sink}, or nowhere (C{sink} None)."""

    def __init__(self, size: int, last: bool, sink: Callable[[bytes], None] | None) -> None:
        self.remaining = size
        self.last = last
        self.sink = sink

    def feed(self, data: bytes) -> bytes:
        """Take this chunk's part of C{data}; returns what follows it (the next command)."""
        n = min(self.remaining, len(data))
        if n and self.sink is not None:
            self.sink(data[:n])
        self.remaining -= n
        return data[n:]

    @property
    def done(self) -> bool:
        return self.remaining == 0
