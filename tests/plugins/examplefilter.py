"""An example filter plugin: ``[filters] inbound = ["example-subject"]``.

A template for writing a real one (see README.rst, "Writing a filter"): the
factory checks its options (``[filters.example-subject]``) and builds the
filter; the filter overrides only the hooks it needs.  It refuses messages
whose Subject contains a configured phrase and marks the others with a
header.  Like examplestore.py it lives outside the twistmail package: tests
add this directory to ``twistmail.plugins.__path__``, which is what
installing a distribution that ships ``twistmail/plugins/examplefilter.py``
does.
"""

from __future__ import annotations

from zope.interface import implementer

from twistmail.config import ConfigError
from twistmail.filters.base import Filter
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import Verdict


class SubjectFilter(Filter):
    name = "example-subject"

    def __init__(self, phrase: str, hostname: str) -> None:
        self.phrase = phrase.lower()
        self.hostname = hostname

    def endOfData(self, session, message):
        # message.headers is parsed; the body would be read from message.open().
        if self.phrase in str(message.headers.get("Subject", "")).lower():
            return Verdict.reject(f"5.7.1 Subject refused by {self.hostname}")
        return Verdict.accept([("X-Example-Filter", f"checked by {self.hostname}")])


@implementer(IMessageFilterFactory)
class SubjectFilterFactory:
    name = "example-subject"
    description = "example: refuses a subject phrase, marks the rest"

    def makeFilter(self, options: dict, context) -> SubjectFilter:
        """Options come from [filters.example-subject] (timeout and on_failure removed)."""
        options = dict(options)
        phrase = options.pop("reject_subject", "buy now")
        if options:
            raise ConfigError(f"[filters.example-subject] {sorted(options)[0]}: unknown option. "
                              "Fix: remove it (the only option is reject_subject)")
        if not isinstance(phrase, str) or not phrase:
            raise ConfigError("[filters.example-subject] reject_subject: expected a phrase, got "
                              f"{phrase!r}. Fix: write e.g. reject_subject = \"buy now\"")
        return SubjectFilter(phrase, context.hostname)


example = SubjectFilterFactory()
