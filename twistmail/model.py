"""Small immutable value objects passed between layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from zope.interface import classImplements

from twistmail.interfaces import IStoredMessage

SYSTEM_FLAGS = frozenset({"\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"})


class StoredMessage(NamedTuple):
    """A snapshot of one message.  A tuple: a 100,000-message folder makes 100,000 of these."""

    uid: int
    uniqueId: str
    flags: frozenset
    size: int
    internalDate: float
    modseq: int = 1  # RFC 7162 mod-sequence: 1 where the backend keeps none


classImplements(StoredMessage, IStoredMessage)


@dataclass(frozen=True)
class FolderChanges:
    """What a refresh or an operation changed, for IMAP untagged responses."""

    added: tuple = ()  # uids now present that were not before
    removed: tuple = ()  # uids gone
    flagsChanged: tuple = ()  # uids whose flags changed
    uidValidityChanged: bool = False
    # The removed messages as they were (StoredMessage), where the backend still had
    # them: a session that has not been told of the expunge yet answers FETCH for them
    # from these (RFC 2180 §4.1).  Optional: a backend may leave it empty.
    expunged: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.flagsChanged or self.uidValidityChanged)


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one transaction."""

    sender: str  # "" for the null reverse-path <>
    recipients: tuple  # canonical local account addresses, deduplicated
    relay: tuple = ()  # remote addresses for the relay queue, deduplicated
    client: str = ""
    helo: str = ""
    id: str = ""
    #: The RCPT TO addresses as the client gave them (for the log), in order.
    rcptTo: tuple = ()
    #: The folder local recipients get it in: "INBOX", or "Junk" for a quarantine verdict.
    folder: str = "INBOX"
    #: What the client asked of delivery status notifications (L{twistmail.dsn.Request}).
    dsn: object = None
    #: MAIL's BODY= (RFC 6152, RFC 3030): "7BIT", "8BITMIME" or "BINARYMIME".
    body: str = "7BIT"
    #: MAIL's REQUIRETLS (RFC 8689 §4.1): relayed only over verified TLS, or returned.
    requireTLS: bool = False
    #: The message says "TLS-Required: No" (RFC 8689 §3) without REQUIRETLS: the relay
    #: may ignore the recipient domain's MTA-STS policy.
    tlsOptional: bool = False
    #: MAIL's SMTPUTF8 (RFC 6531 §3.4): addresses or headers may be UTF-8.
    smtputf8: bool = False


#: Verdict actions (L{Verdict.action}).
ACCEPT, REJECT, TEMPFAIL, QUARANTINE, DISCARD = (
    "accept", "reject", "tempfail", "quarantine", "discard")


@dataclass(frozen=True)
class Verdict:
    """A filter's answer to one stage of an SMTP session.

    * accept: go on (with C{headers} added, at the end of DATA);
    * reject: a 5xx reply (C{code}, default 550) with C{text};
    * tempfail: a 4xx reply (default 451): the client retries later;
    * quarantine: accept, but local recipients get it in their Junk folder;
    * discard: answer 250 and store nothing (use sparingly: the sender believes
      it was delivered).

    C{text} starts with an RFC 3463 enhanced status code where one applies
    ("5.7.1 ..."); C{headers} are (name, value) pairs prepended to the
    message in order, each value already folded if long (RFC 5322 §2.2.3).
    """

    action: str = ACCEPT
    code: int = 0
    text: str = ""
    headers: tuple = ()

    @classmethod
    def accept(cls, headers=()) -> Verdict:
        return cls(ACCEPT, 250, "", tuple(headers))

    @classmethod
    def reject(cls, text: str = "5.7.1 Rejected by policy", code: int = 550) -> Verdict:
        if not 500 <= code <= 599:
            raise ValueError(f"a reject needs a 5xx code, not {code}")
        return cls(REJECT, code, text)

    @classmethod
    def tempfail(cls, text: str = "4.7.1 Try again later", code: int = 451) -> Verdict:
        if not 400 <= code <= 499:
            raise ValueError(f"a tempfail needs a 4xx code, not {code}")
        return cls(TEMPFAIL, code, text)

    @classmethod
    def quarantine(cls, headers=()) -> Verdict:
        return cls(QUARANTINE, 250, "", tuple(headers))

    @classmethod
    def discard(cls) -> Verdict:
        return cls(DISCARD, 250, "")


@dataclass(frozen=True)
class SessionInfo:
    """What a filter may know about an SMTP session at one stage (a snapshot)."""

    role: str  # "inbound" (the MX port) or "submission"
    client: str  # the client's IP address, as text ("" for a local program)
    helo: str = ""  # the HELO/EHLO name, once given
    tls: bool = False  # the session is encrypted (STARTTLS or implicit TLS)
    authenticated: str = ""  # the SMTP AUTH account, "" if none
    id: str = ""  # the transaction id (Postfix's queue id), from MAIL on
    sender: str | None = None  # MAIL FROM reverse-path, "" for <>; None before MAIL
    recipients: tuple = ()  # RCPT TO addresses accepted so far, as given


@dataclass(frozen=True)
class FilterMessage:
    """The message at the end of DATA, for L{IMessageFilter.endOfData}.

    C{headers} is the header section parsed by the stdlib ``email`` package
    (``email.policy.default``); the body is not parsed: read it from C{open()},
    which returns a new binary file of the whole message each time (the caller
    closes it).  Reading it whole into memory is the filter's choice, bounded
    by C{size} (at most ``[smtp] max_message_size``).  When C{inMemory} is
    true, C{open()} touches no disk, so a filter may read it on the reactor
    thread.
    """

    headers: object  # email.message.EmailMessage of the header section only
    size: int
    open: Callable[[], BinaryIO]
    inMemory: bool = False


@dataclass(frozen=True)
class FilterContext:
    """What a filter factory gets to build its filter with (L{IMessageFilterFactory})."""

    hostname: str  # our host name: the authserv-id of Authentication-Results, HELO of lookups
    dataDir: str  # the data directory; a filter keeps its state under state/
    resolver: object  # the shared DNS resolver (twistmail.relay.mx.DnsPythonMXResolver)
    reactor: object
    config: object = None  # the whole twistmail.config.Config, read-only
