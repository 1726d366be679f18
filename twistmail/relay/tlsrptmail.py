# -*- test-case-name: tests.test_tlsrpt -*-
"""The mail that delivers one TLS-RPT report to a ``mailto:`` rua (RFC 8460 §5.3).

A ``multipart/report; report-type="tlsrpt"``: a short text for people, and
the RFC 8460 §4 JSON, gzipped, as ``application/tlsrpt+gzip`` named
``submitter!policy-domain!begin!end!id.json.gz`` (§5.3).  Built with the
stdlib email package; the caller queues it from the null sender.
"""

from __future__ import annotations

import calendar
import email.policy
import gzip
import hashlib
import json
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

#: RFC 8460 §6.4: the media type of a gzipped report.
MEDIA_TYPE = ("application", "tlsrpt+gzip")
_POLICY = email.policy.SMTP.clone(max_line_length=998)


def _epoch(datetime: str) -> int:
    return calendar.timegm(time.strptime(datetime, "%Y-%m-%dT%H:%M:%SZ"))


def reportFilename(report: dict, submitter: str) -> str:
    """RFC 8460 §5.3: sender "!" policy-domain "!" begin "!" end "!" unique-id ".json.gz"."""
    domain = report["policies"][0]["policy"]["policy-domain"]
    dates = report["date-range"]
    uniqueId = hashlib.sha256(report["report-id"].encode()).hexdigest()[:16]  # 1*(ALPHA / DIGIT)
    return (f"{submitter}!{domain}!{_epoch(dates['start-datetime'])}!"
            f"{_epoch(dates['end-datetime'])}!{uniqueId}.json.gz")


def buildReportMail(report: dict, submitter: str, recipients: list[str], now: float) -> bytes:
    """The report mail for C{recipients}, as the bytes to queue (CRLF lines).

    @param report: the JSON object of L{twistmail.relay.tlsrpt.TLSReports.report}.
    @param submitter: our host name: TLS-Report-Submitter, the From domain, the file name.
    """
    [policy] = report["policies"]
    domain = policy["policy"]["policy-domain"]
    summary = policy["summary"]
    message = EmailMessage()
    message["From"] = f"postmaster@{submitter}"
    message["To"] = ", ".join(recipients)
    # RFC 8460 §5.3.2: the Subject, and the two header fields of §5.3.
    message["Subject"] = (f"Report Domain: {domain} Submitter: {submitter} "
                          f"Report-ID: <{report['report-id']}>")
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message["Date"] = formatdate(now, localtime=True)
    message["Message-ID"] = make_msgid("tlsrpt", domain=submitter)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    # RFC 8460 §5.3: a report is delivered despite TLS failures; RFC 8689 §5 says so.
    message["TLS-Required"] = "No"
    dates = report["date-range"]
    message.set_content(
        f"This is an SMTP TLS report (RFC 8460) from {submitter}\n"
        f"for the policy domain {domain},\n"
        f"from {dates['start-datetime']} to {dates['end-datetime']}:\n"
        f"{summary['total-successful-session-count']} sessions with verified TLS, "
        f"{summary['total-failure-session-count']} failed.\n"
        "The report is the attached gzipped JSON.\n", charset="us-ascii", cte="7bit")
    message.add_attachment(gzip.compress(json.dumps(report).encode(), mtime=0), *MEDIA_TYPE,
                           filename=reportFilename(report, submitter))
    # RFC 8460 §5.3: multipart/report (RFC 6522) with report-type "tlsrpt".
    message.replace_header("Content-Type", "multipart/report")
    message.set_param("report-type", "tlsrpt")
    # Lines up to RFC 5322's 998 octets: folded at 78, the file name would be split into
    # RFC 2231 continuations, which report parsers that look for filename="..." miss.
    return message.as_bytes(policy=_POLICY)
