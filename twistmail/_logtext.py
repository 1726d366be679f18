"""Client-supplied text in log lines."""

from __future__ import annotations


def loggable(value, limit: int = 256) -> str:
    """Client-supplied text (a user name, an address, an ID field) made safe for one log line.

    Escaped: control characters (a CR or LF would forge a log line of its own),
    whitespace (a user name "x client=192.0.2.1 result=failed" would put a
    second client= in the line for fail2ban-style filters to pick), and the
    backslash; at most C{limit} characters are kept.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    # Every whitespace character but the space is unprintable already.
    return _escaped(str(value), limit, " \\")


def loggableText(value: str, limit: int = 512) -> str:
    """Free text from a remote party (an SMTP reply), readable and on one line.

    Spaces are kept; control characters, the backslash and ``=`` are escaped, so
    the text can name no ``key=value`` field of the line (``client=``, which
    fail2ban-style filters act on).
    """
    return _escaped(value, limit, "\\=")


def _escaped(value: str, limit: int, special: str) -> str:
    """At most C{limit} characters of C{value}, the unprintable and C{special} ones escaped."""
    cut = len(value) > limit
    value = value[:limit]
    if not value.isprintable() or any(c in special for c in value):
        value = "".join(c if c.isprintable() and c not in special else _escape(c) for c in value)
    return value + "..." if cut else value


def _escape(c: str) -> str:
    if c.isprintable() and c != "\\":
        return f"\\x{ord(c):02x}"  # a space, an =
    return c.encode("unicode_escape").decode("ascii")
