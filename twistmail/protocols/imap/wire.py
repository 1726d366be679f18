# -*- test-case-name: tests.test_imap_wire -*-
"""IMAP command framing: from a byte stream to complete commands.

A command is one or more lines, each but the last ending in a literal
announcement ``{N}`` (synchronizing: the server must answer ``+`` before
the client sends the N octets, RFC 3501 §4.3) or ``{N+}`` (non-synchronizing,
RFC 7888 LITERAL+: the octets follow at once).  The reader checks every size
before it buffers a byte of it, which is what makes hostile input cheap:

* a line longer than C{maxLine} is a protocol error;
* a literal larger than C{maxLiteral} is refused, except the message of an
  APPEND, which may be as large as C{maxMessage} and goes to a spool file
  past 1 MiB instead of memory;
* one APPEND (RFC 3502 MULTIAPPEND) carries at most C{maxMessages} such
  messages, C{maxAppend} octets in all;
* a command's lines and small literals together are bounded by C{maxCommand}.

A refused synchronizing literal costs nothing: the client sends no octets
until it gets ``+``, so the command is answered and the connection goes on.
A refused non-synchronizing literal is already on its way, so the connection
has to be closed (RFC 7888 §4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twistmail.delivery.spool import MessageSource

_LITERAL = re.compile(rb"\{(\d{1,20})(\+?)\}$")
_APPEND = re.compile(rb"^\S+ (?:UID )?APPEND ", re.IGNORECASE)


@dataclass
class Literal:
    """The octets of one literal: in memory, or spooled (an APPEND's message)."""

    source: MessageSource

    @property
    def size(self) -> int:
        return self.source.size

    def bytes(self) -> bytes:
        return self.source.getvalue()


@dataclass
class Command:
    """A complete command: text pieces (without CRLF or literal marks) and Literals, in order."""

    parts: list = field(default_factory=list)

    @property
    def tag(self) -> bytes:
        return commandTag(self.parts[0] if self.parts and isinstance(self.parts[0], bytes) else b"")

    def discard(self) -> None:
        for part in self.parts:
            if isinstance(part, Literal):
                part.source.discard()


@dataclass
class Continue:
    """The client announced a synchronizing literal: answer ``+`` and keep reading."""

    size: int


@dataclass
class Refused:
    """The command cannot be read; answer C{tag} with C{response}.  Fatal: close afterwards."""

    tag: bytes
    response: bytes
    fatal: bool = False


def _nonSynchronizing(line: bytes) -> bool:
    m = _LITERAL.search(line)
    return m is not None and bool(m.group(2))


def commandTag(line: bytes) -> bytes:
    tag = line.split(b" ", 1)[0]
    return tag if tag and len(tag) <= 64 and re.fullmatch(rb"[!#-'*-~]+", tag) and b"+" not in tag \
        else b"*"


class CommandReader:
    """Turns received bytes into L{Command}, L{Continue} and L{Refused} events."""

    def __init__(self, maxLine: int, maxLiteral: int, maxMessage: int, maxCommand: int,
                 spoolDir: str | None = None, maxMessages: int = 1,
                 maxAppend: int | None = None) -> None:
        self.maxLine = maxLine
        self.maxMessages = maxMessages
        self.maxAppend = maxMessage if maxAppend is None else maxAppend
        self.maxLiteral = maxLiteral
        self.maxMessage = maxMessage
        self.maxCommand = maxCommand
        self.spoolDir = spoolDir
        self._buf = b""
        self._skipLine = False  # dropping the rest of an over-long line
        self._skipTail = b""  # its last octets: did it announce a literal?
        self._literal: MessageSource | None = None
        self._reset()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Octets received and not yet read into a command or literal."""
        return len(self._buf)

    @property
    def pending(self) -> bool:
        """True while part of a command has been read (the client is mid-command)."""
        return bool(self._parts or self._need or self._buf)

    def next(self) -> Command | Continue | Refused | None:
        """The next event, or None when more bytes are needed."""
        while True:
            if self._need:
                if not self._buf:
                    return None
                chunk, self._buf = self._buf[:self._need], self._buf[self._need:]
                self._need -= len(chunk)
                self._literal.write(chunk)
                if self._need:
                    return None
                self._parts.append(Literal(self._literal))
                self._literal = None
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.maxLine:
                    # Drop it as it comes, so an endless line costs no memory.
                    start, self._buf = self._buf, b""
                    self._skipTail = (self._skipTail + start)[-32:]
                    if not self._skipLine:
                        self._skipLine = True
                        return self._refuse(b"BAD Command line too long", fatal=bool(self._parts),
                                            line=start)
                return None
            line, self._buf = self._buf[:end], self._buf[end + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._skipLine:
                tail, self._skipLine, self._skipTail = self._skipTail + line, False, b""
                if _nonSynchronizing(tail):
                    return Refused(b"*", b"BAD Command line too long", fatal=True)
                continue
            if len(line) > self.maxLine:
                return self._refuse(b"BAD Command line too long",
                                    fatal=bool(self._parts) or _nonSynchronizing(line), line=line)
            self._size += len(line)
            if self._size > self.maxCommand:
                return self._refuse(b"BAD Command too long",
                                    fatal=bool(self._parts) or _nonSynchronizing(line), line=line)
            m = _LITERAL.search(line)
            if m is None:
                self._parts.append(line)
                command = Command(self._parts)
                self._reset()
                return command
            self._parts.append(line[:m.start()])
            size, sync = int(m.group(1)), not m.group(2)
            refusal, message = self._checkLiteral(size)
            if refusal is not None:
                # A synchronizing literal never comes without our "+"; a
                # non-synchronizing one is already on its way: we must close.
                return self._refuse(refusal, fatal=not sync)
            self._need = size
            self._literal = MessageSource(spoolDir=self.spoolDir)
            if message:
                self._messages += 1
                self._messageOctets += size
            else:
                self._size += size
            if not size:
                self._parts.append(Literal(self._literal))
                self._literal = None
            if sync:
                return Continue(size)

    def _checkLiteral(self, size: int) -> tuple[bytes | None, bool]:
        """(refusal or None, whether the literal is an APPEND's message outside the command budget)."""
        if size <= self.maxLiteral and self._size + size <= self.maxCommand:
            return None, False
        first = self._parts[0] if self._parts else b""
        if not _APPEND.match(first):
            return b"BAD Literal too large: at most %d octets here" % self.maxLiteral, False
        if size > self.maxMessage:
            # RFC 7889 TOOBIG: the client should not retry the same message.
            return b"NO [TOOBIG] Message too large: at most %d octets" % self.maxMessage, False
        if self._messages >= self.maxMessages or self._messageOctets + size > self.maxAppend:
            # RFC 3502 §6.3.11: the whole APPEND fails, nothing is stored.
            return (b"NO [LIMIT] At most %d messages and %d octets in one APPEND"
                    % (self.maxMessages, self.maxAppend)), False
        return None, True

    def _refuse(self, response: bytes, fatal: bool = False, line: bytes = b"") -> Refused:
        tag = Command(self._parts or [line]).tag
        Command(self._parts).discard()
        self._reset()
        return Refused(tag, response, fatal)

    def _reset(self) -> None:
        if self._literal is not None:
            self._literal.discard()
        self._parts: list = []
        self._size = 0
        self._literal = None
        self._need = 0
        self._messages = 0
        self._messageOctets = 0

    def takeBuffered(self) -> bytes:
        """Octets received but not yet read as commands, which are no longer ours to
        read (after COMPRESS: the client's compressed stream)."""
        data, self._buf = self._buf, b""
        return data

    def dropBuffered(self) -> None:
        """Forget bytes received but not yet read as commands (after STARTTLS)."""
        self._buf = b""

    def discard(self) -> None:
        """Drop everything half-read (connection lost): spooled literals included."""
        Command(self._parts).discard()
        self._reset()
        self._buf = b""
