"""Small immutable value objects passed between layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

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
    extra: dict = field(default_factory=dict, compare=False)
