# -*- test-case-name: tests.test_mbox -*-
"""Writing messages into an mbox file (the caller holds the lock) and reading them back.

Appends are all or nothing (the file is truncated back on failure) and
fsynced.  Reads take no lock: they check that each message is still where
the index says (its From_ line, its X-UIDL) and raise L{Moved} when it is
not, so the caller refreshes and retries instead of serving another
message's bytes.  All of it blocks: worker threads only.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import tempfile
import time
from dataclasses import dataclass

from twistmail.errors import StorageError
from twistmail.storage import _mboxformat as fmt
from twistmail.storage._mboxindex import Entry

#: Messages up to this size are read into memory by openContent; larger ones are streamed.
WHOLE_MESSAGE = 1024 * 1024
CHUNK = 1024 * 1024

_counter = itertools.count()


def uniqueId() -> str:
    """A new X-UIDL: time.M<usec>P<pid>Q<n>, the Maildir unique name without its host."""
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}"


def chunks(source):
    """A message given as bytes or as a MessageSource."""
    return [bytes(source)] if isinstance(source, (bytes, bytearray, memoryview)) else source.chunks()


class Moved(Exception):
    """A message is not where the index says: the file changed under us; refresh and retry."""


# -- writing messages ----------------------------------------------------------------------


@dataclass
class Outgoing:
    """A message to write: its content (original bytes) and what goes in its metadata block."""

    content: object  # callable returning an iterable of the message's chunks
    flags: frozenset
    internalDate: float
    uniqueId: str
    uid: int | None = None
    new: bool = False  # a delivery: Status shows it as new to mutt


def writeAll(fd: int, data: bytes, pos: int) -> int:
    view = memoryview(data)
    while view:
        pos += (n := os.pwrite(fd, view, pos))
        view = view[n:]
    return pos


def _measure(out: Outgoing) -> tuple[int, bytes, int]:
    """First pass: the quoted length and last byte, so the block can say Content-Length."""
    q = fmt.quoter()
    length = 0
    for chunk in out.content():
        length += len(q.feed(chunk))
    length += len(q.end())
    return length, q.lastByte, q.count


def endFix(fd: int, size: int) -> bytes:
    """What to write so the file ends with an empty line before a new From_ line."""
    if size == 0:
        return b""
    last = os.pread(fd, 2, max(0, size - 2))
    if last.endswith(b"\n\n") or last == b"\n":
        return b""
    return b"\n" if last.endswith(b"\n") else b"\n\n"


def writeMessages(fd: int, messages: list[Outgoing], base: tuple | None = None) -> list[Entry]:
    """Append C{messages} at the end of the locked file C{fd} and fsync it.

    All or nothing: on any failure the file is truncated back.
    @param base: X-IMAPbase for the first message if the file is empty.
    """
    size = os.fstat(fd).st_size
    pos = size
    entries = []
    try:
        pos = writeAll(fd, endFix(fd, size), pos)
        for out in messages:
            length, lastByte, quoted = _measure(out)
            noEol = lastByte != b"\n"
            head = fmt.fromLine(out.internalDate)
            blk, regionAt = fmt.block(out.uniqueId, out.flags, out.uid,
                                      base if pos == 0 else None,
                                      length if noEol else None, out.new)
            offset = pos
            pos = writeAll(fd, head + blk, pos)
            contentAt = pos
            q = fmt.quoter()
            for chunk in out.content():
                pos = writeAll(fd, q.feed(chunk), pos)
            pos = writeAll(fd, q.end(), pos)
            if pos - contentAt != length:
                raise StorageError("the message changed while it was being stored")
            pos = writeAll(fd, b"\n\n" if noEol else b"\n", pos)
            flagsAt = offset + len(head) + regionAt
            entries.append(Entry(offset, contentAt, flagsAt, contentAt - flagsAt, contentAt,
                                 contentAt, 0, contentAt + length, length - quoted, quoted,
                                 int(out.internalDate), out.uniqueId, True, out.flags))
        os.fsync(fd)
    except BaseException as e:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise StorageError(f"cannot write the mailbox: {e.strerror}") from e
        raise
    return entries


# -- reading messages --------------------------------------------------------------------


def verify(data: bytes, e: Entry) -> None:
    if len(data) != e.end - e.offset or not data.startswith(b"From "):
        raise Moved()
    if e.hasUidl and data.find(b"X-UIDL: " + e.uniqueId.encode() + b"\n", 0,
                               e.contentAt - e.offset) < 0:
        raise Moved()


def readContent(fd: int, e: Entry) -> bytes:
    """The message's bytes as IMAP and POP3 serve them (metadata left out, unquoted)."""
    data = os.pread(fd, e.end - e.offset, e.offset)
    verify(data, e)
    content = (data[e.contentAt - e.offset:e.skipFrom - e.offset] + fmt.JOINTS[e.joint]
               + data[e.skipTo - e.offset:])
    if e.quoted:
        content = fmt.unquote(content)
    if len(content) != e.size:
        raise Moved()
    return content


class _Window(io.RawIOBase):
    """A file object over one stored message that needs no unquoting (large messages)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd, self._pos, self._end = fd, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._end - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def openContent(path: str, e: Entry):
    """A readable file of the message's bytes, without holding it all in memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, e.contentAt - e.offset, e.offset)
        if not head.startswith(b"From ") or (e.hasUidl and b"X-UIDL: " + e.uniqueId.encode()
                                             + b"\n" not in head):
            raise Moved()
        if e.size <= WHOLE_MESSAGE:
            return io.BytesIO(readContent(fd, e))
        if not e.quoted and e.skipFrom == e.skipTo and not e.joint:
            window, fd = _Window(fd, e.contentAt, e.end), -1
            return window
        spill = tempfile.TemporaryFile()
        u = fmt.unquoter()
        for start, stop in ((e.contentAt, e.skipFrom), (e.skipTo, e.end)):
            if start == e.skipTo:
                spill.write(u.feed(fmt.JOINTS[e.joint]))
            while start < stop:
                chunk = os.pread(fd, min(CHUNK, stop - start), start)
                if not chunk:
                    raise Moved()
                spill.write(u.feed(chunk))
                start += len(chunk)
        spill.write(u.end())
        spill.seek(0)
        return spill
    finally:
        if fd >= 0:
            os.close(fd)


def readAll(path: str, entries: list[Entry]) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [readContent(fd, e) for e in entries]
    finally:
        os.close(fd)


def copyRange(src: int, dst: int, start: int, stop: int, pos: int) -> int:
    while start < stop:
        chunk = os.pread(src, min(CHUNK, stop - start), start)
        if not chunk:
            raise Moved()
        pos = writeAll(dst, chunk, pos)
        start += len(chunk)
    return pos


def copyMessage(src: int, dst: int, pos: int, uid: int, e: Entry, flags,
                 base) -> tuple[Entry, int]:
    """Write message C{e} of file C{src} at C{pos} of C{dst} with a fresh metadata block.

    @return: its new entry, and where the next message goes.
    """
    head = os.pread(src, e.contentAt - e.offset, e.offset)
    if not head.startswith(b"From "):
        raise Moved()
    fromLine = head[:head.index(b"\n") + 1]
    joint = fmt.JOINTS[e.joint]
    length = (e.skipFrom - e.contentAt) + len(joint) + (e.end - e.skipTo)
    if e.end > e.skipTo:
        last = os.pread(src, 1, e.end - 1)
    elif joint:
        last = joint[-1:]
    elif e.skipFrom > e.contentAt:
        last = os.pread(src, 1, e.skipFrom - 1)
    else:
        last = b""
    noEol = last != b"\n"
    blk, regionAt = fmt.block(e.uniqueId, flags, uid, base, length if noEol else None)
    offset = pos
    pos = writeAll(dst, fromLine + blk, pos)
    contentAt = pos
    pos = copyRange(src, dst, e.contentAt, e.skipFrom, pos)
    pos = writeAll(dst, joint, pos)
    pos = copyRange(src, dst, e.skipTo, e.end, pos)
    end = pos
    pos = writeAll(dst, b"\n\n" if noEol else b"\n", pos)
    flagsAt = offset + len(fromLine) + regionAt
    return Entry(offset, contentAt, flagsAt, contentAt - flagsAt, contentAt, contentAt, 0, end,
                 e.size, e.quoted, e.internalDate, e.uniqueId, True, frozenset(flags)), pos


class Map:
    """The file mapped read-only (an empty file maps to b"")."""

    def __init__(self, fd: int, size: int) -> None:
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None

    def __enter__(self):
        return self._map if self._map is not None else b""

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            self._map.close()
