"""TLS-RPT (RFC 8460) reports written from what the relay sender records."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import os

import pytest
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from twistmail.mtasts import Policy
from twistmail.relay import tlsrpt
from twistmail.relay.mx import DNSFailure
from twistmail.relay.tlsrpt import RecordError, TLSReports, mailtoAddresses, parseRecord
from twistmail.relay.tlsrptmail import buildReportMail
from twistmail.relay.tlsrptservice import ReportMailer, TLSReportService


def readJSON(path):
    with open(path) as f:
        return json.load(f)


POLICY = Policy("enforce", ("mx.example.test",), 86400, "id1")


def test_one_json_report_per_domain_and_day(tmp_path):
    reports = TLSReports("relay.test", now=lambda: 86400 * 3 + 5)
    reports.record("Example.test", POLICY, None, "mx.example.test", "127.0.0.1")
    reports.record("example.test", POLICY, "starttls-not-supported", "mx.example.test", "127.0.0.1")
    reports.record("example.test", POLICY, "starttls-not-supported", "mx.example.test", "127.0.0.1")
    [path] = reports.flush(str(tmp_path))
    assert path.endswith("1970-01-04_example.test.json")
    data = readJSON(path)
    [policy] = data["policies"]
    assert policy["policy"]["policy-domain"] == "example.test"
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 2}
    assert policy["failure-details"] == [{
        "result-type": "starttls-not-supported", "receiving-mx-hostname": "mx.example.test",
        "receiving-ip": "127.0.0.1", "failed-session-count": 2}]


def test_the_table_is_bounded(monkeypatch):
    monkeypatch.setattr(tlsrpt, "MAX_DOMAINS", 3)
    reports = TLSReports("relay.test", now=lambda: 0)
    for i in range(10):
        reports.record(f"d{i}.test", POLICY, "validation-failure", "mx", "127.0.0.1")
    assert len(reports._days) == 3


def test_a_domain_that_is_not_a_host_name_is_never_a_path(tmp_path):
    reports = TLSReports("relay.test", now=lambda: 0)
    reports.record("../../etc", POLICY, "validation-failure", "mx", "127.0.0.1")
    assert reports.flush(str(tmp_path)) == []


# -- the _smtp._tls TXT record (RFC 8460 §3) ----------------------------------------------


def test_the_record_gives_its_report_uris():
    record = "v=TLSRPTv1; rua=mailto:tls@example.test, https://r.example.test/tlsrpt;ext=x"
    assert parseRecord(["v=spf1 -all", record]) == [
        "mailto:tls@example.test", "https://r.example.test/tlsrpt"]
    assert parseRecord(["v=TLSRPTv1;rua=mailto:a@example.test;"]) == ["mailto:a@example.test"]


def test_no_record_is_none():
    assert parseRecord([]) is None
    assert parseRecord(["v=spf1 -all", "v=TLSRPTv10; rua=mailto:a@example.test"]) is None


@pytest.mark.parametrize("texts", [
    ["v=TLSRPTv1; rua=mailto:a@example.test", "v=TLSRPTv1; rua=mailto:b@example.test"],
    ["v=TLSRPTv1;"],  # rua is required
    ["v=TLSRPTv1; rua="],
    ["v=TLSRPTv1; rua=mailto:a@example.test; rua=mailto:b@example.test"],
    ["v=TLSRPTv1; rua=mailto:a@example.test; garbage"],
    ["v=TLSRPTv1; rua=mailto:a@example.test,"],
    ["v=TLSRPTv1; rua=not a uri"],
    ["v=TLSRPTv1; rua=mailto:a@example.test\x00"],
    ["v=TLSRPTv1; rua=" + ",".join(f"mailto:r{i}@example.test" for i in range(1000))],
])
def test_a_malformed_or_huge_record_is_an_error(texts):
    with pytest.raises(RecordError):
        parseRecord(texts)


def test_only_a_few_mailto_addresses_are_used():
    uris = ["https://r.example.test/", "mailto:a@Example.TEST", "mailto:b%40x@example.test",
            "mailto:c@example.test?subject=x", "mailto:<evil>@example.test",
            "mailto:d@example.test,e@example.test"] + [
        f"mailto:r{i}@example.test" for i in range(20)]
    assert mailtoAddresses(uris) == ["a@example.test", "c@example.test", "r0@example.test",
                                     "r1@example.test", "r2@example.test"]


# -- the report mail (RFC 8460 §5.3) -----------------------------------------------------


DAY3 = 86400 * 3  # 1970-01-04T00:00:00Z
#: Long enough that a header folded at 78 columns would split the file name.
SUBMITTER = "outbound.relay.test"


def _report(domain="example.test"):
    reports = TLSReports("relay.test", now=lambda: DAY3 + 5)
    reports.record(domain, POLICY, "validation-failure", "mx.example.test", "192.0.2.1")
    return reports.report("1970-01-04", domain)


def test_the_report_mail_carries_the_gzipped_json():
    report = _report()
    data = buildReportMail(report, SUBMITTER, ["tls@example.test"], now=DAY3 + 86400 + 60)
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["From"] == f"postmaster@{SUBMITTER}"
    assert message["To"] == "tls@example.test"
    assert message["TLS-Report-Domain"] == "example.test"
    assert message["TLS-Report-Submitter"] == SUBMITTER
    assert message["Subject"] == (f"Report Domain: example.test Submitter: {SUBMITTER} "
                                  f"Report-ID: <{report['report-id']}>")
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["TLS-Required"] == "No"
    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "example.test" in text.get_content()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    begin, end = DAY3, DAY3 + 86399
    assert attachment.get_filename().startswith(f"{SUBMITTER}!example.test!{begin}!{end}!")
    assert attachment.get_filename().endswith(".json.gz")
    assert f'filename="{attachment.get_filename()}"'.encode() in data  # one plain parameter
    assert json.loads(gzip.decompress(attachment.get_content())) == report


# -- writing reports into the data directory, and mailing them -------------------------


def _now(clock):
    return clock.seconds


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


def test_the_service_writes_reports_hourly_and_at_stop(tmp_path):
    clock = task.Clock()
    clock.advance(DAY3 + 5)
    reports = TLSReports("relay.test", now=clock.seconds)
    directory = str(tmp_path / "tlsrpt")
    svc = TLSReportService(reports, directory, clock=clock, run=inline)
    svc.startService()
    reports.record("example.test", POLICY, None, "mx.example.test", "192.0.2.1")
    path = os.path.join(directory, "1970-01-04_example.test.json")
    assert not os.path.exists(path)
    clock.advance(3600)
    assert readJSON(path)["policies"][0]["summary"][
        "total-successful-session-count"] == 1
    reports.record("example.test", POLICY, None, "mx.example.test", "192.0.2.1")
    svc.stopService()
    assert readJSON(path)["policies"][0]["summary"][
        "total-successful-session-count"] == 2


def test_only_changed_reports_are_written_again():
    reports = TLSReports("relay.test", now=lambda: DAY3 + 5)
    reports.record("a.test", POLICY, None, "mx.example.test", "192.0.2.1")
    reports.record("b.test", POLICY, None, "mx.example.test", "192.0.2.1")
    assert [name for name, _ in reports.snapshot()] == ["1970-01-04_a.test.json",
                                                         "1970-01-04_b.test.json"]
    reports.record("b.test", POLICY, None, "mx.example.test", "192.0.2.1")
    [(name, report)] = reports.snapshot()
    assert name == "1970-01-04_b.test.json"
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 2
    assert reports.snapshot() == []


def test_counts_written_before_a_restart_are_kept(tmp_path):
    directory = str(tmp_path / "tlsrpt")
    clock = task.Clock()
    clock.advance(DAY3 + 5)
    for _ in range(2):  # two server lives on the same day
        reports = TLSReports("relay.test", now=clock.seconds)
        svc = TLSReportService(reports, directory, clock=clock, run=inline)
        svc.startService()
        reports.record("example.test", POLICY, "validation-failure", "mx.example.test",
                       "192.0.2.1")
        svc.stopService()
    data = readJSON(os.path.join(directory, "1970-01-04_example.test.json"))
    [policy] = data["policies"]
    assert policy["summary"]["total-failure-session-count"] == 2
    assert policy["failure-details"][0]["failed-session-count"] == 2


class FakeResolver:
    def __init__(self, records):
        self.records = records
        self.asked = []

    def lookupTXT(self, name):
        self.asked.append(name)
        answer = self.records.get(name, [])
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


class FakeQueue:
    def __init__(self):
        self.queued = []

    def enqueue(self, sender, recipients, chunks, *, origin, **kw):
        self.queued.append((sender, list(recipients), b"".join(chunks()), origin))
        return defer.succeed(type("Entry", (), {"id": f"Q{len(self.queued)}"})())


RECORD = {"_smtp._tls.example.test": ["v=TLSRPTv1; rua=mailto:tls@example.test"]}


def _pastReports(directory, domains, clock):
    reports = TLSReports("relay.test", now=clock.seconds)
    for domain in domains:
        reports.record(domain, POLICY, None, "mx.example.test", "192.0.2.1")
    clock.advance(86400)
    reports.flush(directory)


def _mailer(directory, clock, resolver, queue, maxPerDay=100):
    return ReportMailer(directory, "relay.test", resolver, queue, run=inline,
                        now=clock.seconds, maxPerDay=maxPerDay)


def test_a_finished_day_is_mailed_once_across_restarts(tmp_path):
    directory = str(tmp_path / "tlsrpt")
    clock = task.Clock()
    clock.advance(DAY3 + 5)
    reports = TLSReports("relay.test", now=clock.seconds)
    reports.record("example.test", POLICY, None, "mx.example.test", "192.0.2.1")
    reports.flush(directory)
    queue = FakeQueue()
    _mailer(directory, clock, FakeResolver(RECORD), queue).mailDue()
    assert queue.queued == []  # the day is not over
    clock.advance(86400)
    reports.flush(directory)
    _mailer(directory, clock, FakeResolver(RECORD), queue).mailDue()
    [(sender, recipients, data, origin)] = queue.queued
    assert (sender, recipients, origin) == ("", ["tls@example.test"], "tlsrpt")
    message = email.message_from_bytes(data, policy=email.policy.default)
    [_, attachment] = message.iter_parts()
    assert json.loads(gzip.decompress(attachment.get_content()))["report-id"] == \
        "1970-01-04_example.test@relay.test"
    for _ in range(2):  # a restart: a new mailer over the same directory
        _mailer(directory, clock, FakeResolver(RECORD), queue).mailDue()
    assert len(queue.queued) == 1


def test_no_more_than_the_daily_limit_is_mailed(tmp_path):
    directory = str(tmp_path / "tlsrpt")
    clock = task.Clock()
    clock.advance(DAY3 + 5)
    domains = [f"d{i}.test" for i in range(5)]
    records = {f"_smtp._tls.{d}": [f"v=TLSRPTv1; rua=mailto:tls@{d}"] for d in domains}
    _pastReports(directory, domains, clock)
    queue = FakeQueue()
    _mailer(directory, clock, FakeResolver(records), queue, maxPerDay=2).mailDue()
    _mailer(directory, clock, FakeResolver(records), queue, maxPerDay=2).mailDue()
    assert len(queue.queued) == 2
    clock.advance(86400)  # the next day: two more
    _mailer(directory, clock, FakeResolver(records), queue, maxPerDay=2).mailDue()
    _mailer(directory, clock, FakeResolver(records), queue, maxPerDay=2).mailDue()
    assert len(queue.queued) == 4
    clock.advance(86400)
    _mailer(directory, clock, FakeResolver(records), queue, maxPerDay=2).mailDue()
    assert sorted(r[1][0] for r in queue.queued) == [f"tls@{d}" for d in domains]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _text(events):
    return "\n".join(formatEvent(e) for e in events)


def test_a_hostile_record_is_bounded_or_ignored_and_logged(tmp_path, logged):
    directory = str(tmp_path / "tlsrpt")
    clock = task.Clock()
    clock.advance(DAY3 + 5)
    many = "v=TLSRPTv1; rua=" + ",".join(f"mailto:r{i}@many.test" for i in range(30))
    records = {"_smtp._tls.many.test": [many],
               "_smtp._tls.huge.test": [many + ",mailto:x@many.test" * 1000],
               "_smtp._tls.garbage.test": ["v=TLSRPTv1; \x00\x01 rua"]}
    _pastReports(directory, ["many.test", "huge.test", "garbage.test"], clock)
    queue = FakeQueue()
    resolver = FakeResolver(records)
    _mailer(directory, clock, resolver, queue).mailDue()
    [(_, recipients, _, _)] = queue.queued
    assert recipients == [f"r{i}@many.test" for i in range(5)]
    text = _text(logged)
    assert "many.test" in text and "25 more" in text
    assert "huge.test" in text and "garbage.test" in text and "\x00" not in text
    _mailer(directory, clock, resolver, queue).mailDue()  # not asked again, not retried
    assert len(resolver.asked) == 3


def test_a_temporary_dns_failure_is_retried_later(tmp_path):
    directory = str(tmp_path / "tlsrpt")
    clock = task.Clock()
    clock.advance(DAY3 + 5)
    _pastReports(directory, ["example.test"], clock)
    queue = FakeQueue()
    failing = FakeResolver({"_smtp._tls.example.test": DNSFailure(True, "4.4.3", "timed out")})
    _mailer(directory, clock, failing, queue).mailDue()
    assert queue.queued == []
    _mailer(directory, clock, FakeResolver(RECORD), queue).mailDue()
    assert len(queue.queued) == 1
