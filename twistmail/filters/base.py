"""A filter base class: every hook accepts, so a filter implements only what it checks."""

from __future__ import annotations

from zope.interface import implementer

from twistmail.interfaces import IMessageFilter


@implementer(IMessageFilter)
class Filter:
    """Subclass and override the hooks you need; each returns a Verdict, None or a Deferred."""

    name = "unnamed"

    def connect(self, session):
        return None

    def helo(self, session):
        return None

    def mailFrom(self, session):
        return None

    def rcptTo(self, session, recipient: str):
        return None

    def endOfData(self, session, message):
        return None
