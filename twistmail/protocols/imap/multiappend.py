# -*- test-case-name: tests.test_imap_multiappend -*-
"""APPEND with MULTIAPPEND (RFC 3502): one or more messages, stored all or none.

The messages arrive as literals that L{wire.CommandReader} has already
spooled (to disk past 1 MiB) and bounded: at most L{MAX_MESSAGES} large
ones and L{TOTAL_FACTOR} times the APPEND size limit in all.  Nothing is
stored before the whole command has been read and parsed, so a syntax error
in the last message stores none.
"""

from __future__ import annotations

from dataclasses import dataclass

from twistmail.protocols.imap.parser import Arguments, ParseError
from twistmail.protocols.imap.wire import Literal

#: Messages in one APPEND (Dovecot has no such limit; 1000 moves a big folder in a few commands).
MAX_MESSAGES = 1000
#: One APPEND carries at most this many times [imap] max_message_size octets of messages.
TOTAL_FACTOR = 4


@dataclass
class Message:
    """One message of an APPEND: flags and date as sent, and its literal."""

    flags: list
    when: float | None
    literal: Literal


def parse(args: Arguments, utf8: bool = False) -> list[Message]:
    """``1*append-message`` (RFC 3502 §6.3.11): ``[SP flag-list] [SP date-time] SP literal``.

    The literal may be ``UTF8 (~{n} ...)`` (RFC 6855 §4: a message with UTF-8
    header fields), but only once the session has enabled UTF8=ACCEPT (C{utf8}):
    before that the whole command is BAD, as §4 requires.
    """
    messages = []
    while True:
        flags: list[bytes] = []
        when = None
        if args.peek() == b"(":
            flags = args.flagList()
            args.sp()
        if args.peek() == b'"':
            when = args.dateTime()
            args.sp()
        if args.accept(b"UTF8 "):
            if not utf8:
                raise ParseError("APPEND with UTF8 data needs ENABLE UTF8=ACCEPT first (RFC 6855 section 4)")
            args.expect(b"(~")
            literal = args.literal(allowSpooled=True)
            args.expect(b")")
        else:
            literal = args.literal(allowSpooled=True)
        messages.append(Message(flags, when, literal))
        if args.atEnd():
            return messages
        args.sp()


async def appendAll(mailbox, messages: list[tuple]) -> list[int]:
    """Append (source, flags, internalDate) tuples in order; the uids.

    RFC 3502 §6.3.11: if one cannot be stored, none is: those already stored
    are removed again before the failure goes on.  (Another session may see
    them come and go; the backend interface has no transaction to hide that.)
    """
    uids: list[int] = []
    try:
        for source, flags, when in messages:
            uids.append(await mailbox.append(source, flags, when))
    except BaseException:
        if uids:
            await mailbox.remove(uids)
        raise
    return uids
