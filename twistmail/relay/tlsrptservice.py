# -*- test-case-name: tests.test_tlsrpt -*-
"""TLS-RPT reports on disk and in the mail: the service that writes and sends them.

``TLSReportService`` writes what ``TLSReports`` counted into
``<data_dir>/tlsrpt/<day>_<domain>.json`` every hour and when the server
stops, all file work off the reactor thread.  At its first run it adds the
counts an earlier run wrote for today, so a restart loses none.

``ReportMailer`` (``[relay] tlsrpt_mail``) mails each finished day's report
to the ``mailto:`` addresses of the policy domain's ``_smtp._tls`` TXT record
(RFC 8460 §3, §5.3), from the null sender ``<>``.  A report is mailed at most
once: ``<day>_<domain>.mailed`` is written (fsynced) *before* the mail is
queued, so a crash in between loses that report rather than sending it twice;
a day with no record, a malformed one or a permanent DNS failure is marked
too, and not asked again.  At most ``maxPerDay`` report mails are queued per
UTC day (counted in ``mailed.json``, which survives restarts); the rest wait
for the next day.  Reports are mailed for ``MAIL_DAYS`` days after theirs at
the latest; files older than ``KEEP_DAYS`` days are deleted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from twisted.application import internet
from twisted.internet import defer, threads
from twisted.logger import Logger

from twistmail._fsutil import atomicWrite
from twistmail._logtext import loggable, loggableText
from twistmail.dkimsigner import unsigned
from twistmail.relay.mx import DNSFailure
from twistmail.relay.tlsrpt import (
    MAX_RUA,
    REPORT_FILE,
    RecordError,
    TLSReports,
    mailtoAddresses,
    parseRecord,
    readReports,
    writeReports,
)
from twistmail.relay.tlsrptmail import buildReportMail

log = Logger()

#: Seconds between writes of the reports (and attempts to mail finished days).
INTERVAL = 3600
#: A finished day's report is mailed within this many days, or not at all.
MAIL_DAYS = 3
#: Report files (and their marks) older than this many days are deleted.
KEEP_DAYS = 30
_COUNT = "mailed.json"


def _day(now: float, daysAgo: int = 0) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now - daysAgo * 86400))


def dueReports(directory: str, now: float) -> tuple[list[str], int]:
    """Names of finished, unmarked reports (oldest first) and today's mail count.  Blocks.

    Deletes report files and marks older than L{KEEP_DAYS}.
    """
    today, oldest, expired = _day(now), _day(now, MAIL_DAYS), _day(now, KEEP_DAYS)
    try:
        names = set(os.listdir(directory))
    except FileNotFoundError:
        return [], 0
    due = []
    for name in names:
        stem, _, suffix = name.rpartition(".")
        match = REPORT_FILE.match(f"{stem}.json")
        if not match or suffix not in ("json", "mailed"):
            continue
        day = match.group(1)
        if day < expired:
            os.unlink(os.path.join(directory, name))
        elif suffix == "json" and oldest <= day < today and f"{stem}.mailed" not in names:
            due.append(name)
    return sorted(due), _mailedOn(directory, today)


def _mailedOn(directory: str, today: str) -> int:
    try:
        with open(os.path.join(directory, _COUNT), "rb") as f:
            count = json.load(f)
        return int(count["count"]) if count["day"] == today else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def readReport(directory: str, name: str) -> dict:
    with open(os.path.join(directory, name), "rb") as f:
        return json.load(f)


def markDone(directory: str, name: str, recipients: list[str], note: str, now: float) -> None:
    """Record (durably) that report C{name} is dealt with; count it if it is mailed.  Blocks."""
    stem = name[:-len(".json")]
    mark = {"to": recipients, "note": note, "at": int(now)}
    atomicWrite(os.path.join(directory, f"{stem}.mailed"), json.dumps(mark).encode())
    if recipients:
        today = _day(now)
        count = {"day": today, "count": _mailedOn(directory, today) + 1}
        atomicWrite(os.path.join(directory, _COUNT), json.dumps(count).encode())


class ReportMailer:
    """Mails finished days' reports to their domains' rua addresses (see the module docstring)."""

    def __init__(self, directory: str, submitter: str, resolver, queue, *,
                 run: Callable = threads.deferToThread, now: Callable[[], float] = time.time,
                 maxPerDay: int = 1000, sign: Callable = unsigned) -> None:
        """@param resolver: an L{twistmail.interfaces.IMXResolver} (its C{lookupTXT}).
        @param queue: the L{twistmail.relay.queue.RelayQueue} the mails go into.
        @param run: C{run(f, *args) -> Deferred}, running f off the reactor thread.
        @param sign: C{sign(message) -> Deferred[bytes]}: DKIM-signs it (off the reactor).
        """
        self._directory = directory
        self._submitter = submitter
        self._resolver = resolver
        self._queue = queue
        self._run = run
        self._now = now
        self._maxPerDay = maxPerDay
        self._sign = sign
        self.stopping = False

    @defer.inlineCallbacks
    def mailDue(self):
        """Mail what is due now; one report at a time, until done, the limit, or a stop."""
        due, mailed = yield self._run(dueReports, self._directory, self._now())
        for i, name in enumerate(due):
            if self.stopping:
                return
            if mailed >= self._maxPerDay:
                log.warn("tlsrpt reports={left} result=deferred reason=limit of {max} mails "
                         "a day reached ([relay] tlsrpt_max_mails_per_day); they wait for "
                         "tomorrow", left=len(due) - i, max=self._maxPerDay)
                return
            domain = REPORT_FILE.match(name).group(2)
            found = yield self._recipients(domain)
            if found is None:
                continue  # a temporary DNS failure: the next run asks again
            recipients, note = found
            try:
                report = yield self._run(readReport, self._directory, name)
                message = buildReportMail(report, self._submitter, recipients, self._now()) \
                    if recipients else None
            except (OSError, ValueError, KeyError, TypeError) as e:
                recipients, note = [], f"unreadable report: {e}"
            # Marked before it is queued: at most once (see the module docstring).
            yield self._run(markDone, self._directory, name, recipients, note, self._now())
            if not recipients:
                log.info("tlsrpt report={name} result=not-mailed reason={note}", name=name,
                         note=loggableText(note))
                continue
            mailed += 1
            message = yield self._sign(message)
            try:
                # RFC 8460 §5.3 leaves the envelope sender open; <> (RFC 5321 §4.5.5) means
                # a dead rua address can never bounce back here.
                entry = yield self._queue.enqueue("", recipients, lambda m=message: [m],
                                                  origin="tlsrpt")
            except Exception:
                log.failure("tlsrpt report={name} result=lost reason=not queued; "
                            "not retried", name=name)
                continue
            log.info("tlsrpt report={name} result=queued id={id} to={to}", name=name,
                     id=entry.id, to=",".join(loggable(r) for r in recipients))

    @defer.inlineCallbacks
    def _recipients(self, domain: str):
        """(addresses, why) from the domain's TLS-RPT record; None to ask again later."""
        name = f"_smtp._tls.{domain}"
        try:
            texts = yield self._resolver.lookupTXT(name)
        except DNSFailure as e:
            if e.temporary:
                log.info("tlsrpt record={name} result=retry reason={error}", name=name,
                         error=loggableText(e.text))
                return None
            texts = []
        except Exception as e:
            log.info("tlsrpt record={name} result=retry reason={error}", name=name,
                     error=loggableText(repr(e)))
            return None
        try:
            uris = parseRecord(texts)
        except RecordError as e:
            log.warn("tlsrpt record={name} result=ignored reason={error}", name=name,
                     error=loggableText(str(e)))
            return [], f"invalid TLS-RPT record: {e}"
        if uris is None:
            return [], "no TLS-RPT record"
        recipients = mailtoAddresses(uris)
        mailto = sum(1 for uri in uris if uri[:7].lower() == "mailto:")
        if mailto > len(recipients):
            log.warn("tlsrpt record={name} result=truncated reason={n} more mailto addresses "
                     "ignored (at most {max} are used, and only plain addresses)", name=name,
                     n=mailto - len(recipients), max=MAX_RUA)
        # https: reports (RFC 8460 §5.4) are not sent: only mail is.
        return recipients, "" if recipients else "no mailto: address in the record"


class TLSReportService(internet.TimerService):
    """Writes the reports hourly and at stop; mails finished days when a mailer is given."""

    name = "tls reports"

    def __init__(self, reports: TLSReports, directory: str, *, clock=None,
                 run: Callable = threads.deferToThread, interval: float = INTERVAL,
                 mailer: ReportMailer | None = None) -> None:
        super().__init__(interval, self.tick)
        if clock is not None:
            self.clock = clock
        self._reports = reports
        self._directory = directory
        self._run = run
        self._mailer = mailer
        self._loaded = False

    @defer.inlineCallbacks
    def _write(self):
        if not self._loaded:
            # Counts an earlier run wrote for today: merged once, or today's file would be
            # rewritten with this run's counts only.
            earlier = yield self._run(readReports, self._directory, self._reports.today())
            for report in earlier:
                try:
                    self._reports.merge(report)
                except (ValueError, KeyError, TypeError) as e:
                    log.warn("tlsrpt: an earlier report is unreadable, not merged: {error}",
                             error=repr(e))
            self._loaded = True
        yield self._run(writeReports, self._directory, self._reports.snapshot())

    def startService(self) -> None:
        if self._mailer is not None:
            self._mailer.stopping = False
        super().startService()

    @defer.inlineCallbacks
    def tick(self):
        try:
            yield self._write()
            if self._mailer is not None:
                yield self._mailer.mailDue()
        except Exception:
            log.failure("tlsrpt: writing or mailing reports failed; trying again in an hour")

    def stopService(self):
        if self._mailer is not None:
            self._mailer.stopping = True  # a run in progress stops after its current report
        d = super().stopService()

        def final(result):
            # The last counts of this run; _write's load runs now if no tick has done it.
            return self._write().addErrback(
                lambda f: log.failure("tlsrpt: writing reports at stop failed", f)
            ).addCallback(lambda _: result)

        return d.addCallback(final)
