"""Folder-name rules every backend shares: validation is a security boundary.

A folder name comes from the network (IMAP CREATE, SELECT ...).  It must never
turn into a path outside the account, so names are validated here and
backends map each component with an escaping that cannot produce ``/``, ``.``
or ``..``.
"""

from __future__ import annotations

from urllib.parse import unquote

from twistmail.errors import InvalidFolderName

SEPARATOR = "/"
MAX_NAME = 1000  # octets of UTF-8, the whole hierarchical name
MAX_COMPONENT = 200
MAX_DEPTH = 16


def normalize(name: str) -> str:
    """Canonical folder name: INBOX upper-cased, separators trimmed; raise InvalidFolderName."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise InvalidFolderName(f"folder name must be 1..{MAX_NAME} octets")
    parts = name.split(SEPARATOR)
    if len(parts) > MAX_DEPTH:
        raise InvalidFolderName(f"folders nest at most {MAX_DEPTH} levels")
    for part in parts:
        if not part or part in (".", "..") or len(part) > MAX_COMPONENT:
            raise InvalidFolderName(f"invalid folder name component {part!r}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise InvalidFolderName("folder names may not contain control characters")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return SEPARATOR.join(parts)


def isInbox(name: str) -> bool:
    return name.upper() == "INBOX"


def escapeComponent(part: str) -> str:
    """Make a component safe as (part of) a file name: no '.', '/', '%' or '\\' survive
    ('\\' is legal in a POSIX name, but shells, rsync filters and Windows shares read it)."""
    return part.replace("%", "%25").replace(".", "%2E").replace("/", "%2F").replace("\\", "%5C")


def unescapeComponent(part: str) -> str:
    return unquote(part)
