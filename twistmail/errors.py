"""Exceptions shared across layers.

Storage errors are what the protocol adapters translate into protocol replies:
``StorageError`` becomes SMTP ``451 4.3.0``, IMAP ``NO`` and POP3 ``-ERR``.
"""


class StorageError(Exception):
    """A disk, permission or consistency error; the operation left nothing partial."""


class NoSuchFolder(StorageError):
    """The folder does not exist."""


class FolderExists(StorageError):
    """The folder to create or rename to already exists."""


class InvalidFolderName(StorageError):
    """The name is empty, too long, has control characters or would escape the account."""


class NoSuchMessage(StorageError):
    """The uid is not (or no longer) in the folder."""


class TooManyKeywords(StorageError):
    """The folder has no room for another keyword (Maildir's 26 letters); nothing changed."""


class AccountsUnavailable(StorageError):
    """The accounts cannot be looked up now (their database is unreachable): answered with
    a temporary error (SMTP 451 4.3.0 / 454 4.7.0, IMAP NO [UNAVAILABLE], POP3 -ERR
    [SYS/TEMP]), never as an unknown user or a wrong password."""
