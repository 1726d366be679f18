# -*- test-case-name: tests.test_filters -*-
"""FilterChain: the configured filters of one role, run in order at one hook.

Each filter runs under its own timeout; one that raises or overruns it gets
its ``on_failure`` verdict (tempfail by default, like Postfix's
``milter_default_action = tempfail``), logged with its name and never shown
to the client as a traceback.  The first verdict other than accept ends the
hook; accept verdicts' headers are collected for the message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from twistmail.config import FILTER_TIMEOUT
from twistmail.filters.message import headerLines
from twistmail.model import ACCEPT, QUARANTINE, Verdict

log = Logger()

#: What a client is told when a filter failed and its on_failure is tempfail.
FAILED = Verdict.tempfail("4.7.1 Temporary problem checking the message, try again later")


@dataclass(frozen=True)
class ConfiguredFilter:
    """One enabled filter with what the chain reads from ``[filters.<name>]``."""

    name: str
    filter: object  # an IMessageFilter provider
    timeout: float = FILTER_TIMEOUT
    onFailure: str = "tempfail"  # or "accept" (twistmail.config.FILTER_ON_FAILURE)


@dataclass(frozen=True)
class Outcome:
    """What one hook decided: the final verdict and the headers accept verdicts added
    (in filter order), the quarantine's included."""

    verdict: Verdict
    headers: tuple = ()
    decidedBy: str = ""  # the filter whose verdict this is ("" for accept)


class FilterChain:
    """Runs the hooks of C{filters} in order, one at a time."""

    def __init__(self, filters: Sequence[ConfiguredFilter], clock) -> None:
        self.filters = tuple(filters)
        self._clock = clock

    @property
    def names(self) -> tuple:
        return tuple(f.name for f in self.filters)

    @defer.inlineCallbacks
    def run(self, hook: str, *args, context: str = "", before: Callable | None = None):
        """Call C{hook} on each filter; fire with an L{Outcome}.

        A quarantine does not stop the hook (later filters may still reject); the
        first reject, tempfail or discard does.

        @param before: called as C{before(headers)} ahead of each filter with the
            headers added so far, returning the arguments to call it with, or a
            Deferred of them (the end of DATA rebuilds its L{FilterMessage} this
            way); else C{args}.
        @param context: who and what, for the log line of a failed filter.
        """
        headers: list = []
        quarantined = None
        quarantinedBy = ""
        for entry in self.filters:
            callArgs = (yield defer.maybeDeferred(before, tuple(headers))) if before else args
            verdict = yield self._call(entry, hook, callArgs, context)
            headers.extend(verdict.headers)
            if verdict.action == ACCEPT:
                continue
            if verdict.action == QUARANTINE:
                if quarantined is None:
                    quarantined, quarantinedBy = verdict, entry.name
                log.info("filter {filter} {hook} {context} result=quarantine", filter=entry.name,
                         hook=hook, context=context)
                continue
            log.info("filter {filter} {hook} {context} result={action} {code} {text}",
                     filter=entry.name, hook=hook, context=context, action=verdict.action,
                     code=verdict.code, text=verdict.text)
            return Outcome(verdict, tuple(headers), entry.name)
        return Outcome(quarantined or Verdict.accept(), tuple(headers), quarantinedBy)

    def _call(self, entry: ConfiguredFilter, hook: str, args, context: str) -> defer.Deferred:
        d = defer.maybeDeferred(getattr(entry.filter, hook), *args)
        if not d.called:
            d.addTimeout(entry.timeout, self._clock)
        d.addCallback(_verdict)
        return d.addErrback(self._failed, entry, hook, context)

    def _failed(self, failure, entry: ConfiguredFilter, hook: str, context: str) -> Verdict:
        if failure.check(defer.TimeoutError):
            log.warn("filter {filter} {hook} {context} result=timeout after {timeout}s, "
                     "on_failure={onFailure}", filter=entry.name, hook=hook, context=context,
                     timeout=entry.timeout, onFailure=entry.onFailure)
        else:
            log.failure("filter {filter} {hook} {context} result=error, on_failure={onFailure}",
                        failure, filter=entry.name, hook=hook, context=context,
                        onFailure=entry.onFailure)
        return Verdict.accept() if entry.onFailure == "accept" else FAILED


def _verdict(result) -> Verdict:
    if result is None:
        return Verdict.accept()
    if not isinstance(result, Verdict):
        raise TypeError(f"a filter hook returned {result!r}, not a Verdict or None")
    headerLines(result.headers)  # ValueError for a bad field: the filter's failure
    return result
